"""Evaluation a clinician can read: metrics with patient-bootstrap intervals, calibration, subgroups,
Grad-CAM, model comparison, batch inference (``predict``) and the report."""
