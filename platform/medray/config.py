"""Job configuration: one YAML file, validated by pydantic, overridable with ``--set a.b=value``.

Every section rejects unknown keys, so a typo is an error that names the field instead of a
setting that silently does nothing. Local paths are made absolute when the config is loaded,
because Ray workers do not run in the directory the user typed the command in.

A config error is one bounded line: field paths, and bad values only when they are short scalars
outside any secret-looking field (salt, key, token, password). The value of an unknown key is never
shown, since a misspelt secret (``slat:``) is still a secret. YAML whose aliases expand past
``safe_yaml.MAX_NODES`` values (a "billion laughs") is refused before anything is built from it.
"""

from __future__ import annotations

import codecs
import re
import warnings
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from medray import safe_yaml
from medray.choices import BACKBONE_NAMES, augment_params
from medray.config_errors import describe
from medray.errors import MedrayError
from medray.io import dicomweb, storage
from medray.io.listing import IMAGE_EXTENSIONS

Uri = Annotated[str, AfterValidator(storage.absolute)]

MAX_CONFIG_BYTES = 1_000_000


def _codec(name: str) -> str:
    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError(f"unknown encoding {name!r}; e.g. utf-8, cp1252, latin-1, utf-16-le") from None
    return name


class ConfigError(MedrayError, ValueError):
    """A config that cannot be used; the message names each bad field and value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DemoDataConfig(_Section):
    patients: int = Field(600, ge=10)
    image_size: int = Field(256, ge=64, le=2048)
    seed: int = 0


class SplitConfig(_Section):
    val: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    min_positive: float = Field(0.5, ge=0, le=1, description="minimum share of positive images in val and test")
    label: str | None = Field(None, description="label whose positives are enriched; default: the first label")
    train_keeps_positive: float = Field(
        0.5, ge=0, le=1, description="share of the positive patients that val and test may never take from train"
    )
    seed: int = 0
    labels: list[str] | None = Field(None, description="several labels, each enriched to min_positive; overrides label")
    sites: list[str] | None = Field(None, description="hold out these values of the 'site' column as test (cross-site)")
    folds: int | None = Field(None, ge=2, description="grouped stratified k-fold over the patients outside test")

    @model_validator(mode="after")
    def _room_for_train(self):
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must leave patients for train, got {self.val} + {self.test}")
        return self


class DataConfig(_Section):
    manifest: Uri | None = Field(None, description="split manifest; default <storage>/<name>/data/manifest.parquet")
    image_size: int = Field(128, ge=16, le=2048)
    augment: str = Field("cxr", description="augmentation policy: cxr, derm, fundus, histo or none")
    augment_params: dict[str, float] = Field(default_factory=dict, description="overrides of the policy's defaults")
    cache_decoded: bool = Field(True, description="keep decoded, resized images in Ray's object store across epochs")
    fold: int | None = Field(None, ge=0, description="with a k-fold manifest: this fold is val, the others train")
    cache: Uri | None = Field(None, description="medray prepare's output; default <manifest>.cache-<size>px-<c>ch")
    use_cache: bool = Field(True, description="train from the prepared cache when it is there and up to date")
    shuffle: Literal["global", "local"] = Field(
        "global", description="training rows in a new order every epoch: global (all rows) or local (blocks + a buffer)"
    )

    @model_validator(mode="after")
    def _known_policy(self):
        augment_params(self.augment, self.augment_params)  # raises, naming the unknown policy or parameter
        return self


class AuditConfig(_Section):
    max_distance: int = Field(12, ge=0, le=256, description="Hamming distance (of 256 bits) that counts as a near duplicate")
    thumbnails: int = Field(12, ge=0, description="near-duplicate pairs drawn in near_duplicates.png")


class SamplingConfig(_Section):
    strategy: Literal["none", "undersample", "oversample", "balanced", "patient_balanced"] = "none"
    label: str | None = Field(None, description="label whose classes under/oversample balance; default: split.label")
    samples_per_epoch: int | None = Field(None, ge=1, description="default: the training split's size")


class LossConfig(_Section):
    weighting: Literal["none", "seed", "pos_weight", "effective_number"] = "seed"
    beta: float = Field(0.999, gt=0, lt=1, description="effective_number's beta (Cui et al. 2019)")
    focal_gamma: float = Field(0.0, ge=0, description="> 0 adds the focal term (Lin et al. 2017)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="targets pulled this far towards uniform")


class ModelConfig(_Section):
    backbone: str = "resnet18"
    in_channels: Literal[1, 3] = Field(1, description="1 for radiographs, 3 for colour photographs and slides")
    weights: Uri | None = Field(None, description="local or s3:// torchvision state dict or medray checkpoint")
    weights_sha256: str | None = None
    freeze: Literal["full", "head_only", "stages", "gradual"] = Field("full", description="what trains (see freezing.py)")
    freeze_stages: int = Field(0, ge=0, description="with freeze: stages, how many of the first stages stay frozen")
    unfreeze_every: int = Field(1, ge=1, description="with freeze: gradual, epochs between unfreezing stages")
    lr_decay: float = Field(1.0, gt=0, le=1, description="discriminative learning rates: ×decay per stage below the head")
    head: Literal["backbone", "linear", "knn", "mlp", "abmil"] = Field(
        "backbone",
        description="backbone: fine-tune the image model; linear, knn, mlp: a head on the embedding store (embed.output); "
        "abmil: attention-MIL over each slide's patch embeddings",
    )

    @model_validator(mode="after")
    def _known_backbone(self):
        if self.backbone not in BACKBONE_NAMES:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {', '.join(sorted(BACKBONE_NAMES))}")
        return self


class EmbedConfig(_Section):
    """``medray embed``: a frozen backbone turns images or WSI patches into an embedding store (medray.embeddings)."""

    backbone: str = Field("resnet18", description="a registry name (model.backbone's), timm:<name>, or hf:<local folder or cached repo id>")
    weights: Uri | None = Field(None, description="local or s3:// weights file; hf: models load from a local folder or a pre-filled cache")
    input: Uri | None = Field(None, description="manifest or patch store to embed; default the run's manifest, or wsi.patches when set")
    output: Uri | None = Field(None, description="the embedding store; default <storage>/<name>/embeddings")
    image_size: int | None = Field(
        None, ge=8, le=4096, description="input side in pixels; default the encoder's own (224, or a medray checkpoint's training size)"
    )
    model_args: dict[str, bool | int | float | str] = Field(
        default_factory=dict, description="timm: keyword arguments of timm.create_model, e.g. {init_values: 1.0e-5} for UNI"
    )
    batch_size: int = Field(64, ge=1, description="images per forward pass of an actor")
    actors: int = Field(1, ge=1, description="encoder actors: one GPU each when the cluster has GPUs")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPU actors: torch threads each; the other CPUs decode images")
    part_size: int = Field(1000, ge=1, description="inputs per store part; a rerun skips committed parts")


class HeadConfig(_Section):
    """``model.head: linear | knn | mlp``: a small head trained on the embedding store (medray.embeddings.heads)."""

    C: float | None = Field(
        None, gt=0, description="linear: inverse L2 strength on standardised vectors; default chosen per output on val from 1e-4…1e2"
    )
    k: int = Field(20, ge=1, description="knn: neighbours (cosine) whose labels vote")
    weights: Literal["uniform", "distance"] = Field("distance", description="knn: each neighbour's vote, equal or 1/distance")
    hidden: int = Field(256, ge=1, description="mlp: units of its one hidden layer")
    dropout: float = Field(0.2, ge=0, lt=1, description="mlp: dropout before its output layer")


class TrainConfig(_Section):
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0, description="leave CPUs free for Ray Data's decoding and shuffling")
    prefetch_batches: int = Field(2, ge=0, description="batches each worker fetches ahead while the model trains")
    use_gpu: bool = False
    amp: bool = Field(True, description="mixed precision; only takes effect on GPU")
    checkpoints_to_keep: int = Field(2, ge=1, description="the best by val AUROC and the latest are always kept")
    max_failures: int = Field(0, ge=-1)
    seed: int = 0
    warmup_epochs: int = Field(1, ge=0, description="epochs of linear learning-rate warm-up before the cosine decay")
    ema: float = Field(0.0, ge=0, lt=1, description="decay per step of the weights' moving average (0: off); see recipe.py")
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without a better val AUROC")


class EvaluateConfig(_Section):
    checkpoint: Uri | None = Field(None, description="default: the best checkpoint of this run")
    batch_size: int = Field(64, ge=1)
    threshold: Literal["youden", "sensitivity", "specificity"] = Field(
        "youden", description="how the operating threshold is chosen on val: Youden's J or a target"
    )
    threshold_target: float = Field(0.9, gt=0, lt=1, description="the target sensitivity or specificity")
    bootstrap: int = Field(1000, ge=20, description="patient resamples for the 95 % intervals")
    seed: int = 0
    deployment_prevalence: dict[str, float] = Field(
        default_factory=dict, description="per label: the prevalence where the model will be used, for PPV/NPV"
    )
    levels: list[Literal["image", "study", "patient"]] = Field(
        ["image", "study"],
        description="levels reported (image always): study where the manifest has study_id, patient; each scored by its images' maximum probability",
    )
    rater_votes: Uri | None = Field(
        None, description="CSV of readers' votes (a row per image and rater, a 0/1 column per label): each rater as a point on the ROC"
    )
    rater_image_column: str = Field("Image Index", description="rater_votes: the column naming the image file")
    rater_column: str = Field("Rater", description="rater_votes: the column naming the rater")
    calibration_bins: int = Field(10, ge=2, le=100)
    calibrate: bool = Field(
        True,
        validation_alias=AliasChoices("calibrate", "temperature_scaling"),  # its name before Platt and isotonic maps
        description="fit a calibration on val (prior correction, Platt or isotonic: the lowest val ECE), write calibration.json to the checkpoint",
    )
    subgroup_min_cases: int = Field(10, ge=1, description="subgroups with fewer positives or negatives are marked small")
    gallery: int = Field(3, ge=0, description="top false positives and false negatives per label, with Grad-CAM")
    intended_use: str | None = Field(
        None, description="the model card's intended-use statement; default: 'not stated', with what the data show"
    )

    @model_validator(mode="after")
    def _prevalence_is_a_share(self):
        bad = {k: v for k, v in self.deployment_prevalence.items() if not 0 < v < 1}
        if bad:
            raise ValueError(f"deployment_prevalence must lie strictly between 0 and 1, got {bad}")
        return self


class ScoreConfig(_Section):
    input: Uri | None = Field(
        None, description="folder, s3:// prefix (recursive), dicomweb://host:port/root?filters, or a .parquet/.csv manifest"
    )
    output: Uri | None = Field(None, description="default <storage>/<name>/scores/<first 12 hex digits of the model's sha256>")
    checkpoint: Uri | None = Field(None, description="default: the best checkpoint of this run")
    batch_size: int = Field(64, ge=1)
    actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0, description="CPU actors: torch threads each; the other CPUs decode images")
    part_size: int = Field(1000, ge=1, description="inputs per output part; a rerun skips committed parts")
    extensions: list[str] = Field(
        list(IMAGE_EXTENSIONS), description="files scored when listing a folder or prefix (the same list ingest uses)"
    )
    gradcam_threshold: float | None = Field(
        None, gt=0, lt=1, description="write Grad-CAM PNGs (<output>/_gradcam/) for inputs with a probability at or above this"
    )
    gradcam_max: int = Field(100, ge=1, description="at most this many Grad-CAM images per label, the highest scores first")
    dicom_sr: bool = Field(
        False, description="one DICOM SR per scored DICOM study: STOW-RS to a DICOMweb source, else <output>/_dicom_sr/*.dcm"
    )


class ValidateConfig(_Section):
    manifest: Uri | None = Field(
        None, description="medray validate-external: another site's manifest (its test split if it has a split column, else every row)"
    )
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="outputs go to <run>/external/<name>/; default: the manifest's file stem"
    )
    checkpoint: Uri | None = Field(None, description="default: the best checkpoint of this run")


class DriftConfig(_Section):
    """Limits of ``medray drift RUN_A RUN_B`` (docs/operations.md explains the defaults); thresholds also
    give the share above threshold that each scoring run's ``_summary.json`` keeps."""

    threshold: float = Field(0.5, gt=0, lt=1, description="threshold of a label neither in thresholds nor in the run's summary")
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="per-label operating thresholds; default: the model's (val-chosen by medray evaluate, as in its SRs)",
    )
    psi: float = Field(0.2, gt=0, description="population stability index of a label's scores (and of mean intensity)")
    ks: float = Field(0.1, gt=0, le=1, description="two-sample Kolmogorov–Smirnov statistic of a label's scores")
    positive_rate: float = Field(0.05, gt=0, le=1, description="absolute change of a label's share at or above its threshold")
    error_rate: float = Field(0.02, gt=0, le=1, description="absolute change of the share of inputs that could not be scored")
    mean_intensity: float = Field(10.0, gt=0, description="absolute change of the mean gray level (0–255) of the inputs")
    image_size: float = Field(0.2, gt=0, description="relative change of the mean stored width or height")
    category_share: float = Field(0.1, gt=0, le=1, description="absolute change of a modality/view/site/bit-depth category's share")
    new_category: float = Field(0.01, ge=0, le=1, description="share at which a category absent from RUN_A is flagged")

    @model_validator(mode="after")
    def _thresholds_are_probabilities(self):
        for label, value in self.thresholds.items():
            if not 0 < value < 1:
                raise ValueError(f"thresholds.{label} must lie between 0 and 1")
        return self


class TrackingConfig(_Section):
    tensorboard: bool = Field(True, description="training metrics as TensorBoard files in <run>/tensorboard")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; needs the mlflow package installed")
    mlflow_experiment: str = "medray"


class SweepConfig(_Section):
    space: Uri | None = Field(None, description="search space YAML, e.g. tune_spaces/imbalance.yaml")
    seeds: int = Field(0, ge=0, description="rerun the best trial with this many other seeds")


class ColumnsConfig(_Section):
    """Column mapping of a ``csv`` (CSV or Parquet) label table."""

    image: str = Field("image", description="column holding the image path or ID")
    image_pattern: str | list[str] = Field(
        "{}", description="path from the column's value, e.g. images/{}.jpg; a list is tried in order (.jpg, then .png)"
    )
    patient: str | None = Field("patient_id", description="patient column (not needed with a grouping rule)")
    study: str | None = None
    labels: list[str] = Field(default_factory=list, description="multi-label: the 0/1 label columns")
    label: str | None = Field(None, description="multi-class / ordinal: the one column of classes or grades")
    classes: list[str] | None = Field(None, description="class order (required for ordinal grades); default: sorted")
    metadata: dict[str, str] = Field(default_factory=dict, description="source column → manifest column, e.g. Sex: sex")


class IngestConfig(_Section):
    format: Literal["nih-cxr14", "chexpert", "medmnist", "csv", "folder", "dicomweb"] = Field(
        "nih-cxr14", description="the source's layout; a dicomweb:// source is always ingested as dicomweb"
    )
    labels: list[str] | None = Field(None, description="labels (or classes) to ingest; default: all of the dataset's")
    task: Literal["auto", "binary", "multi-label", "multi-class", "ordinal"] = Field(
        "auto", description="csv: multi-label unless set; medmnist: auto detects binary / multi-label / multi-class"
    )
    columns: ColumnsConfig = ColumnsConfig()
    grouping: Literal["none", "ham10000", "eyes"] = Field("none", description="csv: patient groups for HAM10000 / EyePACS")
    images: Uri | None = Field(None, description="csv: folder relative image paths start from; default: the table's")
    encoding: Annotated[str, AfterValidator(_codec)] | None = Field(
        None, description="label CSVs without a byte-order mark; default: UTF-8, else cp1252 with a warning"
    )
    uncertainty: Literal["ignore", "ones", "zeros"] = Field("ignore", description="chexpert: policy for -1 labels")
    uncertainty_per_label: dict[str, Literal["ignore", "ones", "zeros"]] = Field(default_factory=dict)
    views: list[str] | None = Field(None, description="chexpert: keep only these Frontal/Lateral or AP/PA values")
    official_val: float = Field(0.1, ge=0, lt=1, description="nih-cxr14: share of train_val patients carved into val")
    seed: int = 0
    check: bool = Field(True, description="decode every image once and quarantine those that fail")
    dicom_ids: bool | None = Field(None, description="patient/study IDs from DICOM headers; default: only for folder and dicomweb")
    pseudonymise: bool | None = Field(
        None, description="IDs → keyed hashes: true all, false none; default: the IDs read from DICOM headers"
    )
    salt: SecretStr | None = Field(
        None, exclude=True, description="pseudonym key; default: env MEDRAY_PSEUDONYM_SALT, else salt_file. Never logged, never saved"
    )
    salt_file: str | None = Field(
        None, description="key file, made once (mode 0600) outside the outputs; default: env MEDRAY_SALT_FILE, else ~/.config/medray/salt"
    )


class S3Config(_Section):
    """For S3-compatible stores (MinIO, Ceph); default: AWS_ENDPOINT_URL_S3 / AWS_REGION from the environment."""

    endpoint_url: str | None = Field(None, description="e.g. http://minio.local:9000")
    region: str | None = None
    connect_timeout: float = Field(storage.CONNECT_TIMEOUT, gt=0, description="seconds to wait for a connection to the store")
    read_timeout: float = Field(storage.READ_TIMEOUT, gt=0, description="seconds to wait for each answer of the store")
    attempts: int = Field(storage.ATTEMPTS, ge=1, le=10, description="tries per request, the first included, before a job fails")


class DicomWebConfig(_Section):
    """A PACS as a source (``dicomweb://host:port/root?Filter=value``, for ingest and score.input); see medray.io.pacs."""

    authorization_env: str = Field(
        dicomweb.AUTHORIZATION_ENV, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the Authorization header's value (never the value itself)",
    )  # fmt: skip
    page_size: int = Field(dicomweb.PAGE_SIZE, ge=1, le=100_000, description="QIDO-RS results per request (limit/offset)")
    timeout: float = Field(dicomweb.TIMEOUT, gt=0, description="seconds to wait for each answer of the PACS")
    labels: Uri | None = Field(None, description="ingest: CSV or Parquet table of 0/1 label columns and a label_key column")
    label_key: Literal["AccessionNumber", "StudyInstanceUID", "SOPInstanceUID"] = Field(
        "AccessionNumber", description="ingest: the column of the labels table (and the DICOM attribute) instances are matched by"
    )


class WsiConfig(_Section):
    """Whole-slide images (medray.wsi): patch extraction, and training and evaluation on its patches."""

    slides: Uri | None = Field(None, description="slide manifest (CSV or Parquet): image, patient_id, labels, optional mask")
    patches: Uri | None = Field(None, description="extracted patches; when set, train and evaluate use them (default output <run>/patches)")
    target_mpp: float = Field(1.0, gt=0, description="microns per pixel of the patches")
    patch_size: int = Field(224, ge=8, le=4096, description="patch side in pixels at target_mpp")
    stride: int | None = Field(None, ge=1, description="grid step in pixels at target_mpp; default patch_size")
    min_tissue: float = Field(0.5, ge=0, le=1, description="share of a patch the tissue mask must cover")
    max_patches: int | None = Field(None, ge=1, description="cap of patches per slide")
    cap_by: Literal["random", "tissue"] = Field("random", description="which patches the cap keeps")
    labels_from: Literal["slide", "annotation"] = Field("slide", description="annotation: tumour_label from each slide's mask")
    tumour_label: str | None = Field(None, description="the label annotation masks mark; default the first label")
    tumour_threshold: float = Field(0.5, gt=0, le=1, description="tumour share that makes a patch positive")
    thumbnail_side: int = Field(512, ge=64, description="tissue detection runs on the coarsest level at least this long")
    min_region_um2: float = Field(20_000.0, ge=0, description="tissue regions smaller than this (µm²) are dropped")
    default_mpp: float | None = Field(None, gt=0, description="microns per pixel for slides that do not record it")
    chunk_patches: int = Field(64, ge=1, description="patches per extraction task: bounds each task's memory")
    cache_gb: float = Field(20.0, gt=0, description="local cache for slides fetched from S3")
    stain_normalise: Literal["none", "macenko", "reinhard"] = Field(
        "none", description="stain normalisation of each patch as it is read, to stain_reference (docs/wsi.md)"
    )
    stain_reference: Uri | None = Field(
        None, description="PNG patch of H&E (local or s3://) to normalise to; default a standard H&E reference"
    )
    aggregate: Literal["mean", "max", "topk"] = Field("mean", description="patch scores → slide score")
    top_k: int = Field(5, ge=1, description="with aggregate: topk, the mean of the k highest patch scores")


class MilConfig(_Section):
    """``model.head: abmil``: gated-attention multiple-instance learning over each slide's patch embeddings (medray.wsi.mil)."""

    level: Literal["slide", "patient"] = Field("slide", description="one bag per slide, or per patient (all of the patient's slides)")
    bag_size: int = Field(
        512,
        ge=1,
        description="patches per bag in training: larger bags are sampled afresh each epoch (seeded); evaluation uses every patch",
    )
    hidden: int = Field(128, ge=1, description="width of the patch projection")
    attention: int = Field(64, ge=1, description="width of the gated attention branch")
    dropout: float = Field(0.25, ge=0, lt=1, description="dropout on the projected patches in training")
    bags_per_step: int = Field(1, ge=1, description="bags per optimiser step (padded and masked)")
    baseline: bool = Field(True, description="evaluate: also fit patch-label mean pooling on the same embeddings and compare")


# The section is called ``validate`` (``--set validate.manifest=…``), which hides pydantic v1's deprecated
# ``BaseModel.validate`` classmethod that nothing here calls; only that one warning is silenced.
warnings.filterwarnings("ignore", message='Field name "validate" in "JobConfig" shadows', category=UserWarning)


class JobConfig(_Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the run's name: outputs go to <storage>/<name>/")
    storage: Uri = Field("runs", description="local folder or s3:// prefix of the runs; a rerun of a name resumes it")
    demo_data: DemoDataConfig = DemoDataConfig()
    split: SplitConfig = SplitConfig()
    data: DataConfig = DataConfig()
    sampling: SamplingConfig = SamplingConfig()
    loss: LossConfig = LossConfig()
    model: ModelConfig = ModelConfig()
    head: HeadConfig = HeadConfig()
    embed: EmbedConfig = EmbedConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    score: ScoreConfig = ScoreConfig()
    validate: ValidateConfig = ValidateConfig()
    drift: DriftConfig = DriftConfig()
    tune: SweepConfig = SweepConfig()
    ingest: IngestConfig = IngestConfig()
    s3: S3Config = S3Config()
    dicomweb: DicomWebConfig = DicomWebConfig()
    wsi: WsiConfig = WsiConfig()
    mil: MilConfig = MilConfig()
    audit: AuditConfig = AuditConfig()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage, self.name)

    @property
    def embeddings(self) -> str:
        return self.embed.output or storage.join(self.run_dir, "embeddings")

    @property
    def manifest(self) -> str:
        return self.data.manifest or storage.join(self.run_dir, "data", "manifest.parquet")


def parse_overrides(pairs: list[str]) -> dict:
    """``["train.epochs=3", "model.backbone=densenet121"]`` → nested dict; values parsed as YAML."""
    nested: dict = {}
    for number, pair in enumerate(pairs, 1):
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            # Not echoed: a malformed pair may be a secret (``ingest.salt:...``, or a salt given without its key).
            raise ConfigError(f"--set expects section.key=value, e.g. train.epochs=3; --set number {number} is not of that form")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        try:
            node[leaf] = safe_yaml.load(value) if value else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: the value is not valid YAML ({safe_yaml.problem(err)})") from None
    return nested


def merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def build_config(raw: dict | None = None, overrides: list[str] | None = None, source: str = "") -> JobConfig:
    data = merge(raw or {}, parse_overrides(overrides or []))
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe(err, source, JobConfig)) from None


def load_config(path: str | None, overrides: list[str] | None = None) -> JobConfig:
    raw = {}
    if path:
        try:
            text = storage.read_text(path)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a UTF-8 text file") from None
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES:,} characters: not a config file")
        try:
            raw = safe_yaml.load(text) or {}
        except safe_yaml.TooLarge as err:
            raise ConfigError(f"{path} is refused: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {safe_yaml.problem(err)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return build_config(raw, overrides, source=path or "(defaults)")


def save_config(config: JobConfig, uri: str) -> None:
    """The resolved config, written next to a job's outputs so the run can be reproduced."""
    storage.write_text(uri, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
