import hashlib
import os
import subprocess
import sys

import pandas as pd

from medray.data.demo_data import FINDINGS, NIH_HEADER, generate


def _digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_demo_data_is_written_in_the_nih_layout(demo_dir):
    header = (demo_dir / "Data_Entry_2017.csv").read_text().splitlines()[0]
    assert header == NIH_HEADER
    entries = pd.read_csv(demo_dir / "Data_Entry_2017.csv")
    assert len(entries) == len(list((demo_dir / "images").glob("*.png")))
    assert entries["Image Index"].str.fullmatch(r"\d{8}_\d{3}\.png").all()
    tokens = set("|".join(entries["Finding Labels"]).split("|"))
    assert tokens <= {*FINDINGS, "No Finding"}


def test_patients_have_follow_up_studies_with_sex_and_age(demo_dir):
    entries = pd.read_csv(demo_dir / "Data_Entry_2017.csv")
    studies = entries.groupby("Patient ID").size()
    assert studies.max() > 1 and studies.mean() > 1.5
    assert set(entries["Patient Gender"]) == {"M", "F"}
    assert entries["Patient Age"].between(18, 99).all()


def test_findings_are_imbalanced_like_real_chest_x_rays(tmp_path):
    generate(str(tmp_path), patients=400, image_size=64, seed=3)
    entries = pd.read_csv(tmp_path / "Data_Entry_2017.csv")
    mass = entries["Finding Labels"].str.contains("Mass").mean()
    assert 0.04 <= mass <= 0.12
    assert (entries["Finding Labels"] == "No Finding").mean() > 0.5


def test_three_raters_vote_on_every_image_and_sometimes_disagree(demo_dir):
    votes = pd.read_csv(demo_dir / "rater_votes.csv")
    entries = pd.read_csv(demo_dir / "Data_Entry_2017.csv")
    assert (votes.groupby("Image Index")["Rater"].nunique() == 3).all()
    assert set(votes["Image Index"]) == set(entries["Image Index"])
    split_decisions = votes.groupby("Image Index")[list(FINDINGS)].nunique().gt(1).any(axis=1)
    assert 0 < split_decisions.mean() < 0.5


def test_generation_is_deterministic_for_a_seed_in_any_process(tmp_path):
    # Two processes hash strings differently (PYTHONHASHSEED): nothing may depend on a set's order.
    script = "import sys; from medray.data.demo_data import generate; generate(sys.argv[1], patients=60, image_size=16, seed=11)"
    for folder, hash_seed in (("a", "1"), ("b", "2")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / folder)], env=env, check=True)
    generate(str(tmp_path / "c"), patients=60, image_size=16, seed=12)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
