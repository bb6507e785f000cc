"""One way to open a URI (local path or ``s3://``) and to decode an image or a DICOM file from it."""
