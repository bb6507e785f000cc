"""Ingest end to end through a real S3 API (moto server on 127.0.0.1): label table, PNG and DICOM
images on S3, manifest and quarantine written back to S3, endpoint given in the config."""

import io

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from dicom_files import dataset, gradient, to_bytes
from medray.cli import main
from medray.data.manifest import read_manifest
from medray.io import storage


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_csv_and_images_on_s3_ingest_with_the_endpoint_from_the_config(s3, ray_session, tmp_path, monkeypatch, capsys):
    client, bucket = s3
    endpoint = client.meta.endpoint_url
    files = {
        "site-a/img/1.png": png(10),
        "site-a/img/2.png": png(200),
        "site-a/img/3.dcm": to_bytes(dataset(gradient())),
    }
    for key, data in files.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    table = pd.DataFrame({"image": ["img/1.png", "img/2.png", "img/3.dcm", "img/gone.png"], "patient_id": ["a", "b", "b", "c"],
                          "Effusion": ["1", "0", "1", "0"]})  # fmt: skip
    client.put_object(Bucket=bucket, Key="site-a/labels.csv", Body=table.to_csv(index=False).encode())
    config = {
        "s3": {"endpoint_url": endpoint, "region": "us-east-1"},
        "ingest": {"format": "csv", "columns": {"labels": ["Effusion"]}, "pseudonymise": True},
    }
    (tmp_path / "ingest.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # only the config names the endpoint (in this process)
    monkeypatch.setenv("MEDRAY_PSEUDONYM_SALT", "s3-test-salt")

    out = f"s3://{bucket}/manifests/site-a.parquet"
    main(["ingest", f"s3://{bucket}/site-a/labels.csv", out, "--config", str(tmp_path / "ingest.yaml")])

    assert "4 in = 3 kept + 1 quarantined" in capsys.readouterr().out
    frame = read_manifest(out).frame
    assert frame["image"].tolist() == [
        f"s3://{bucket}/site-a/{name}" for name in ("img/1.png", "img/2.png", "img/3.dcm")
    ]
    assert frame["patient_id"].nunique() == 2 and not frame["patient_id"].isin(["a", "b"]).any()
    quarantine = storage.read_bytes(f"s3://{bucket}/manifests/site-a.quarantine.parquet")
    reasons = pd.read_parquet(io.BytesIO(quarantine))
    assert reasons.to_dict("records") == [
        {"image": f"s3://{bucket}/site-a/img/gone.png", "reason": "image file not found"}
    ]


def test_medmnist_on_s3_writes_its_png_files_to_s3(s3, ray_session):
    from medray.data.datasets import Options, ingest_medmnist

    client, bucket = s3
    arrays = {f"{split}_{kind}": np.zeros((2, 28, 28), np.uint8) if kind == "images" else np.array([[0], [1]])
              for split in ("train", "val", "test") for kind in ("images", "labels")}  # fmt: skip
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    client.put_object(Bucket=bucket, Key="mnist/pneumoniamnist.npz", Body=buffer.getvalue())
    out = f"s3://{bucket}/mnist/manifest.parquet"
    result = ingest_medmnist(f"s3://{bucket}/mnist/pneumoniamnist.npz", out, ["pneumonia"], Options(check=False))
    frame = read_manifest(out).frame
    assert result.balance == "6 in = 6 kept + 0 quarantined"
    assert frame["image"].iloc[0] == f"s3://{bucket}/mnist/manifest_images/train/0.png"
    listed = client.list_objects_v2(Bucket=bucket, Prefix="mnist/manifest_images/")["Contents"]
    assert len(listed) == 6
