"""S3's region: the config's s3.region when given, else whatever the AWS SDK resolves (never a guess)."""

from __future__ import annotations

import os
import subprocess
import sys

REGION_OF = "from medray.io import storage; {configure}print(storage.filesystem('s3://bucket/key')[0].region)"


def region(tmp_path, configure: str = "") -> str:
    (tmp_path / "aws-config").write_text("[default]\nregion = eu-west-3\n")
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")}
    env["AWS_CONFIG_FILE"] = str(tmp_path / "aws-config")  # the user's profile, as `aws configure` writes it
    command = [sys.executable, "-c", REGION_OF.format(configure=configure)]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_without_a_configured_region_the_aws_profile_decides(tmp_path):
    assert region(tmp_path) == "eu-west-3"


def test_the_configs_s3_region_wins(tmp_path):
    assert region(tmp_path, "storage.configure_s3(region='ca-central-1'); ") == "ca-central-1"
