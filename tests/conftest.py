"""Shared fixtures: one local Ray for the session, small generated datasets made by the tests."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session", autouse=True)
def pseudonym_key_file(tmp_path_factory):
    """Ingests in tests (and the commands they start) keep their pseudonym key in a temporary folder,
    never in the user's ~/.config/medray/salt."""
    path = tmp_path_factory.mktemp("pseudonym-key") / "salt"
    saved = os.environ.get("MEDRAY_SALT_FILE")
    os.environ["MEDRAY_SALT_FILE"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("MEDRAY_SALT_FILE", None)
    else:
        os.environ["MEDRAY_SALT_FILE"] = saved


@pytest.fixture(scope="session")
def s3():
    """A real S3 API on 127.0.0.1, started before Ray so that Ray's workers inherit its endpoint."""
    from s3 import s3_server

    with s3_server() as (client, bucket):
        yield client, bucket


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real PACS (Orthanc with DICOMweb) on 127.0.0.1 with an empty store, for one test module."""
    from orthanc import available, orthanc_server

    if not available():
        pytest.skip("Debian's orthanc and orthanc-dicomweb packages are not installed (.ci/run installs them)")
    with orthanc_server(tmp_path_factory.mktemp("orthanc")) as pacs:
        yield pacs


@pytest.fixture(scope="session")
def pacs_credentials():
    """The test PACS's credentials in MEDRAY_DICOMWEB_AUTHORIZATION, exported before Ray starts as a user exports
    them before starting a job: Ray's workers, which list and fetch instances, inherit the environment of that
    moment, and `orthanc` (module-scoped) starts after the session's Ray. Every test PACS takes these credentials."""
    from orthanc import authorization

    saved = os.environ.get("MEDRAY_DICOMWEB_AUTHORIZATION")
    os.environ["MEDRAY_DICOMWEB_AUTHORIZATION"] = authorization()
    yield
    if saved is None:
        os.environ.pop("MEDRAY_DICOMWEB_AUTHORIZATION", None)
    else:
        os.environ["MEDRAY_DICOMWEB_AUTHORIZATION"] = saved


@pytest.fixture(scope="session")
def ray_session(s3, pacs_credentials):
    import ray

    # With its dashboard, as on a real cluster: Ray Train frees a stopped trial's resources through it.
    from medray.runtime import local_runtime_env

    # Workers set up as medray's own local Ray sets them up (its runtime environment pins Ray's state API to
    # this cluster, which Ray Train's clean-up relies on while other Rays run on the machine).
    ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="WARNING", runtime_env=local_runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def remove_leftover_placement_groups() -> int:
    """Removes placement groups nothing should hold any more; returns how many there were.

    A Ray Train V2 run inside a long-lived driver can leave its worker group's placement group behind
    after ``fit()`` returns (its controller actor lingers; Ray ties such groups to the job's driver, see
    ray-project/ray#58515). A job submitted with ``ray job submit`` ends and frees it; the test session's
    one driver does not, and 0.5 CPU held by nothing starves a later test's Ray Data tasks (a sweep trial
    then waits forever for a whole free CPU on a 2-CPU Ray)."""
    from ray._raylet import PlacementGroupID
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    live = [pg for pg, info in placement_group_table().items() if info["state"] in ("PENDING", "CREATED", "RESCHEDULING")]
    for pg in live:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg))))
    return len(live)


@pytest.fixture(autouse=True)
def free_ray_between_tests(request):
    """After each test that used the session's Ray, nothing of it holds CPUs for the next one."""
    yield
    if "ray_session" in request.fixturenames:
        left = remove_leftover_placement_groups()
        if left:
            warnings.warn(f"{request.node.nodeid} left {left} Ray placement group(s) behind; removed", stacklevel=1)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from medray.data.demo_data import generate

    out = tmp_path_factory.mktemp("demo")
    generate(str(out), patients=120, image_size=64, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_manifest(demo_dir, ray_session):
    from medray.data.datasets import ingest_nih
    from medray.data.demo_data import FINDINGS
    from medray.data.manifest import read_manifest

    result = ingest_nih(str(demo_dir / "Data_Entry_2017.csv"), str(demo_dir / "manifest.parquet"), labels=list(FINDINGS))
    return read_manifest(result.manifest)


@pytest.fixture(scope="session")
def split_manifest_path(demo_manifest, demo_dir):
    from medray.data.manifest import Manifest, write_manifest
    from medray.data.splits import split_by_patient

    frame = split_by_patient(demo_manifest, val=0.2, test=0.2, min_positive=0.3, label="Mass", seed=0)
    return write_manifest(Manifest(frame, demo_manifest.labels), str(demo_dir / "split.parquet"))
