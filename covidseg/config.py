"""Typed, validated view of `params.yaml`.

Every section is a frozen pydantic model that forbids unknown keys, so a typo or an impossible
value is one clear error when a stage starts, not a crash an hour into training.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from covidseg.errors import CovidSegError
from covidseg.modelnames import arch_error, encoder_error

ZENODO_URL = "https://zenodo.org/records/3757476/files"
ZENODO_SHA256 = {  # as published for record 3757476
    "COVID-19-CT-Seg_20cases.zip": (
        "a5060480eff9315b069b086312dac4872777901fb80d268a5a83edd9f4e7b440"
    ),
    "Infection_Mask.zip": "87901c73fdd2230260e61d2dbc57bf56026efc28264006b8ea2bf411453c1694",
    "Lung_Mask.zip": "f060b0d0299939a6d95ddefdbfa281de1a779c4d230a5adbd32414711d6d8187",
    "Lung_and_Infection_Mask.zip": (
        "34f5a573cb8fb53cb15abe81868395d9addf436854826a6fd6e70c2b294f19c3"
    ),
}
BENCHMARK_FOLDS = 5  # the dataset authors' Task 1 folds, either protocol
CPU_BATCH_SIZE = 2  # slices per forward pass of `predict` on a CPU: the fastest per slice there
GPU_BATCH_SIZE = 8
Precision = Literal["auto", "fp32", "bf16", "int8"]  # inference paths (docs: fast inference)
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
DeviceChoice = Literal["auto", "cpu", "cuda", "mps"]  # `runtime.device`, `predict --device`
DEVICE_CHOICES: tuple[DeviceChoice, ...] = get_args(DeviceChoice)
OutputFormat = Literal["nifti", "dicom-seg", "both"]  # `predict --output-format`
OUTPUT_FORMATS: tuple[OutputFormat, ...] = get_args(OutputFormat)
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
PositiveFloat = Annotated[float, Field(gt=0)]
CREDENTIALS = re.compile(r"://[^/?#@\s]+@")  # the user:password@ of a URL
HU_LIMIT = 100_000.0  # far beyond any CT value (about -1024 to 30000 HU)


_Choice = TypeVar("_Choice", bound=str)


def one_of(value: object, choices: tuple[_Choice, ...], what: str) -> _Choice:
    """`value` as one of `choices` (e.g. `PRECISIONS`), for values that pydantic has not
    validated (the command line); a ValueError names the choices."""
    for choice in choices:
        if value == choice:
            return choice
    raise ValueError(f"{what} must be one of {choices}, got {value!r}")


class _Section(BaseModel):
    # NaN and infinities are refused in every number (`lr: .inf`, `hu_window: [-.inf, 250]`)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DownloadParams(_Section):
    """Where the archives come from and what they must hash to."""

    base_url: str = ZENODO_URL
    sha256: dict[str, Sha256] = Field(default_factory=lambda: dict(ZENODO_SHA256))
    retries: Annotated[int, Field(ge=0, le=20)] = 4
    backoff_s: Annotated[float, Field(ge=0)] = 1.0
    timeout_s: PositiveFloat = 60.0

    @field_validator("sha256")
    @classmethod
    def _archives(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("name at least one archive")
        for name in value:
            if "/" in name or "\\" in name or not name.endswith(".zip"):
                raise ValueError(f"{name!r} is not a plain .zip archive name")
        return value


DatasetSource = Literal["zenodo-3757476", "folder"]
ZENODO_SOURCE: DatasetSource = "zenodo-3757476"
# DVC needs an existing path for the dataset folder dep; with the Zenodo source it is this
# folder, the record described in the nnU-Net layout's terms (its dataset.json).
ZENODO_DESCRIPTION = "covidseg/resources/zenodo-3757476"


class DatasetParams(_Section):
    """Which cases: the Zenodo record (`download`) or a folder in nnU-Net v2's raw layout."""

    source: DatasetSource = ZENODO_SOURCE
    folder: Annotated[str, Field(min_length=1)] = ZENODO_DESCRIPTION
    infection_label: Annotated[str, Field(min_length=1)] | None = None  # None: by its name
    encoding: Literal["hu", "uint8", "auto"] = "hu"  # folder images: HU, 0-255 window, by value


class PrepareParams(_Section):
    """How volumes become normalised slice stores."""

    hu_window: tuple[float, float] = (-1250.0, 250.0)
    image_size: Annotated[int, Field(ge=16, le=2048)] = 512
    image_dtype: Literal["float16", "float32"] = "float16"
    compression: Literal["gzip", "lzf", "none"] = "gzip"
    target: Literal["infection", "lung_infection"] = "infection"

    @field_validator("hu_window")
    @classmethod
    def _window(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"needs low < high, got {list(value)}")
        if max(abs(value[0]), abs(value[1])) > HU_LIMIT or value[1] - value[0] < 1:
            raise ValueError(  # the window is applied in float32: 1e39 would overflow it
                f"needs both ends within [-{HU_LIMIT:g}, {HU_LIMIT:g}] HU and at least 1 HU "
                f"apart, got {list(value)}"
            )
        return value

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"must be a multiple of 32 (encoder strides), got {value}")
        return value


class SplitParams(_Section):
    """Which cases train, validate and test."""

    scheme: Literal["benchmark", "kfold"] = "benchmark"
    protocol: Literal["16_4", "4_16"] = "16_4"
    n_folds: Annotated[int, Field(ge=2, le=20)] = 5
    # the folds this experiment trains and tests: all of them is the protocol; [0] a quick run
    folds: tuple[Annotated[int, Field(ge=0)], ...] = (0, 1, 2, 3, 4)
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2
    seed: Annotated[int, Field(ge=0)] = 0  # numpy's generators take no negative seed

    @field_validator("protocol", mode="before")
    @classmethod
    def _yaml11_int(cls, value: Any) -> Any:
        # YAML 1.1 readers (PyYAML) load an unquoted 16_4 as the integer 164.
        return {164: "16_4", 416: "4_16"}.get(value, value) if isinstance(value, int) else value

    @property
    def fold_count(self) -> int:
        """How many folds the scheme has (the dataset authors': 5)."""
        return BENCHMARK_FOLDS if self.scheme == "benchmark" else self.n_folds

    @model_validator(mode="after")
    def _folds_in_range(self) -> SplitParams:
        if not self.folds:
            raise ValueError("folds: name at least one fold, e.g. [0]")
        if len(set(self.folds)) != len(self.folds):
            raise ValueError(f"folds: {list(self.folds)} names a fold twice")
        missing = [f for f in self.folds if f >= self.fold_count]
        if missing:
            every = list(range(self.fold_count))
            raise ValueError(
                f"folds {missing} do not exist: {self.scheme} has folds 0-{self.fold_count - 1} "
                f"(set split.folds, e.g. {every})"
            )
        return self


class LossParams(_Section):
    bce_weight: Annotated[float, Field(ge=0)] = 1.0
    dice_weight: Annotated[float, Field(ge=0)] = 1.0

    @model_validator(mode="after")
    def _some_weight(self) -> LossParams:
        if self.bce_weight + self.dice_weight <= 0:
            raise ValueError("at least one loss weight must be positive")
        return self


class AugmentParams(_Section):
    enabled: bool = True
    flip: bool = True
    rotate_deg: Annotated[float, Field(ge=0, le=180)] = 10.0
    scale: Annotated[float, Field(ge=0, lt=1)] = 0.1
    intensity: Annotated[float, Field(ge=0, le=1)] = 0.1


class TrainParams(_Section):
    """The optimisation recipe (defaults: the original study)."""

    encoder_weights: Literal["imagenet"] | None = None
    epochs: Annotated[int, Field(ge=1)] = 100
    batch_size: Annotated[int, Field(ge=1)] = 2
    lr: PositiveFloat = 1.0e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    scheduler: Literal["constant", "cosine"] = "constant"
    loss: LossParams = LossParams()
    augment: AugmentParams = AugmentParams()
    positive_fraction: Annotated[float, Field(ge=0, le=1)] = 0.5
    steps_per_epoch: Annotated[int, Field(ge=1)] | None = None
    early_stopping_patience: Annotated[int, Field(ge=1)] | None = None
    seed: Annotated[int, Field(ge=0)] = 42
    bf16: bool = True  # bf16 autocast on CUDA: part of the recipe (it changes the weights)
    compile: bool = False  # torch.compile the training step (CUDA graphs on CUDA)
    gpu_augment: bool = True  # on CUDA: augment batches on the GPU, workers only read
    max_loss_factor: Annotated[float, Field(gt=1)] | None = None  # stop an exploding run


class EvaluateParams(_Section):
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    nsd_tolerance_mm: PositiveFloat = 3.0
    lung_nsd_tolerance_mm: PositiveFloat = 1.0
    tta_flip: bool = False
    precision: Precision = "fp32"  # metrics that do not depend on a timing (docs)


class RuntimeParams(_Section):
    """How to run, not what to compute: no result depends on these, so changing them neither
    invalidates a checkpoint nor makes DVC rerun a stage."""

    device: DeviceChoice = "auto"
    num_workers: Annotated[int, Field(ge=0)] = 1
    eval_batch_size: Annotated[int, Field(ge=1)] = 8
    prepare_workers: Annotated[int, Field(ge=1)] | None = None  # None: one per core


# What `aggregate` may compare cross-validations by: a mean over every out-of-fold test case.
PromoteMetric = Literal[
    "dice",
    "nsd",
    "hd95",
    "iou",
    "sensitivity",
    "precision",
    "left_lung_dice",
    "left_lung_nsd",
    "right_lung_dice",
    "right_lung_nsd",
]
LOWER_IS_BETTER = frozenset({"hd95"})  # a distance; every other metric is an overlap


class TrackingParams(_Section):
    """Where runs are recorded, and when a cross-validation's ensemble becomes `alias`."""

    experiment: Annotated[str, Field(min_length=1)] = "covidseg"
    registered_model: Annotated[str, Field(min_length=1)] = "covidseg"
    alias: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")] = "champion"
    promote: Literal["if_better", "always", "never"] = "if_better"
    promote_metric: PromoteMetric = "dice"
    promote_direction: Literal["higher", "lower"] = "higher"

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
            raise ValueError(f"{value!r} is reserved by the MLflow model registry")
        return value

    @model_validator(mode="after")
    def _direction_fits_the_metric(self) -> TrackingParams:
        fits = "lower" if self.promote_metric in LOWER_IS_BETTER else "higher"
        if self.promote_direction != fits:
            raise ValueError(
                f"promote_direction must be {fits} for {self.promote_metric}, "
                f"got {self.promote_direction!r}"
            )
        return self


class Params(_Section):
    """The whole of `params.yaml`."""

    arch: str = "UnetPlusPlus"
    encoder: str = "densenet201"
    dataset: DatasetParams = DatasetParams()
    download: DownloadParams = DownloadParams()
    prepare: PrepareParams = PrepareParams()
    split: SplitParams = SplitParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()
    runtime: RuntimeParams = RuntimeParams()

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if reason := arch_error(value):
            raise ValueError(reason)
        return value

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        if reason := encoder_error(value):
            raise ValueError(reason)
        return value

    @model_validator(mode="after")
    def _promote_metric_is_scored(self) -> Params:
        metric = self.tracking.promote_metric
        if "lung" in metric and self.prepare.target != "lung_infection":
            raise ValueError(
                f"tracking.promote_metric: {metric} is scored only with prepare.target: "
                "lung_infection"
            )
        return self

    @model_validator(mode="after")
    def _folder_source(self) -> Params:
        if self.dataset.source != "folder":
            return self
        if self.dataset.folder == ZENODO_DESCRIPTION:
            raise ValueError("dataset.folder: name your dataset's folder (dataset.source: folder)")
        if self.split.scheme == "benchmark":
            raise ValueError(
                "split.scheme: benchmark is the Zenodo record's folds; a folder dataset needs "
                "split.scheme: kfold"
            )
        return self


# Keys that moved: an old params.yaml gets one line naming the new place.
MOVED_KEYS = {
    ("train", "device"): "runtime.device",
    ("train", "num_workers"): "runtime.num_workers",
    ("evaluate", "batch_size"): "runtime.eval_batch_size",
    ("split", "fold"): "split.folds, a list (e.g. split.folds: [0])",
}


def _moved(raw: dict[str, Any]) -> list[str]:
    """`train.device: moved to runtime.device` for each old key present, nested or written
    as one dotted key (`train.device: cpu`, as `dvc exp run -S` names it)."""
    found = []
    for (section, key), new in MOVED_KEYS.items():
        nested = isinstance(raw.get(section), dict) and key in raw[section]
        if nested or f"{section}.{key}" in raw:
            found.append(f"{section}.{key}: moved to {new}")
    return found


def _unknown(loc: tuple[int | str, ...]) -> str:
    """Why a key is unknown, with the place it may have meant."""
    key = str(loc[-1])
    if len(loc) == 1 and "." in key:
        return "unknown key (params.yaml nests sections: `train:`, then `lr:` indented below)"
    homes = [
        f"{name}.{key}"
        for name, field in Params.model_fields.items()
        if isinstance(field.default, BaseModel) and key in type(field.default).model_fields
    ]
    return f"unknown key (did you mean {' or '.join(homes)}?)" if homes else "unknown key"


def _one_line(error: ValidationError, source: str) -> str:
    """Turn pydantic's report into one line: `params.yaml: train.lr: must be > 0; ...`."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = _unknown(item["loc"])
        parts.append(f"{where}: {message}" if where else message)
    return f"{source}: " + "; ".join(parts)


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced (`https://***@host/...`), for
    messages and tracked params that other accounts can read."""
    return CREDENTIALS.sub("://***@", text)


_SectionT = TypeVar("_SectionT", bound=BaseModel)


def parse_section(section: type[_SectionT], raw: Any, source: str) -> _SectionT:
    """Validate a mapping as one section (a model's recipe as `PrepareParams`); one line."""
    try:
        return section.model_validate(raw)
    except ValidationError as error:
        raise CovidSegError(_one_line(error, source)) from None


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate an already-loaded mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise CovidSegError(f"{source}: expected a mapping at the top level")
    if moved := _moved(raw):
        raise CovidSegError(f"{source}: " + "; ".join(moved))
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise CovidSegError(_one_line(error, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate `params.yaml`; every problem is a `CovidSegError`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CovidSegError(f"{path}: no such file") from None
    except yaml.YAMLError as error:
        raise CovidSegError(f"{path}: not valid YAML ({error})".replace("\n", " ")) from None
    return parse_params(raw, str(path))


def flatten(params: Params) -> dict[str, Any]:
    """`{"train.lr": 1e-4, ...}`: the form MLflow and reports record."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and not (prefix.endswith("sha256")):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            out[prefix] = value

    walk("", params.model_dump(mode="json"))
    return out
