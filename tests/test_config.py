"""Config machinery: YAML onto nested dataclasses, dotted overrides, strict keys, coercion, validation, docs."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    check,
    config_help,
    config_markdown,
    field_docs,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from rlhf.errors import UserError


@dataclass
class Source:
    name: str = "gold"
    """Reward source name."""
    weight: float = 1.0
    """Weight of this source
    in the ensemble."""

    def validate(self) -> None:
        check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")


@dataclass
class Algo:
    beta: float = 0.1
    """KL coefficient."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """Which preference loss."""
    seed: int = 0
    """Random seed."""
    note: str | None = None
    """Free text."""
    tags: list[str] = field(default_factory=list)
    """Labels."""
    steps: list[int] = field(default_factory=lambda: [1, 2])
    """Milestones."""
    weights: dict[str, float] = field(default_factory=dict)
    """Named weights."""
    sources: list[Source] = field(default_factory=list)
    """Reward sources."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy."""
    ref: ModelConfig | None = None
    """A separate reference model; unset: the initial policy."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batches and steps."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""

    def validate(self) -> None:
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")


@dataclass
class Child(Source):
    extra: bool = False
    """Added by the subclass."""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error(cls: type, path: Path | None = None, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, overrides)
    return str(info.value)


def test_nested_yaml_keeps_other_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        beta: 0.2
        model:
          path: /ckpt
          lora: {r: 8, target_modules: [q_proj, v_proj]}
        train: {batch_size: 16, micro_batch_size: 4}
        """,
    )
    cfg = load_config(Algo, path)
    assert cfg.beta == 0.2 and cfg.model.path == "/ckpt"
    assert cfg.model.lora.r == 8 and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.lora.alpha == 16.0 and cfg.model.dtype == "float32"  # untouched defaults
    assert (cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.epochs) == (16, 4, 1)
    assert cfg.optim == OptimConfig()


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    # YAML 1.1 reads `1e-5` as the string "1e-5"; float fields accept it. Ints widen to float.
    cfg = load_config(Algo, write(tmp_path, "optim: {lr: 1e-5, weight_decay: 1}\n"))
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.weight_decay, float)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(Algo, write(tmp_path, "# nothing\n")) == Algo()


@pytest.mark.parametrize(
    ("override", "get", "expected"),
    [
        (["--optim.lr", "3e-4"], lambda c: c.optim.lr, 3e-4),
        (["--optim.lr=3e-4"], lambda c: c.optim.lr, 3e-4),
        (["--optim.lr", "2"], lambda c: c.optim.lr, 2.0),
        (["--train.epochs", "3"], lambda c: c.train.epochs, 3),
        (["--train.epochs=3"], lambda c: c.train.epochs, 3),
        (["--model.trust_remote_code", "yes"], lambda c: c.model.trust_remote_code, True),
        (["--model.trust_remote_code=1"], lambda c: c.model.trust_remote_code, True),
        (["--model.trust_remote_code"], lambda c: c.model.trust_remote_code, True),
        (["--logging.progress", "false"], lambda c: c.logging.progress, False),
        (["--logging.progress=No"], lambda c: c.logging.progress, False),
        (["--logging.progress", "0"], lambda c: c.logging.progress, False),
        (["--model.path", "/a b"], lambda c: c.model.path, "/a b"),
        (["--model.path="], lambda c: c.model.path, ""),
        (["--tags", "a, b,c"], lambda c: c.tags, ["a", "b", "c"]),
        (["--tags", '["a,b", "c"]'], lambda c: c.tags, ["a,b", "c"]),
        (["--tags="], lambda c: c.tags, []),
        (["--steps", "3,4"], lambda c: c.steps, [3, 4]),
        (["--weights", '{"gold": 0.5}'], lambda c: c.weights, {"gold": 0.5}),
        (["--note", "hello"], lambda c: c.note, "hello"),
        (["--note", "null"], lambda c: c.note, None),
        (["--model.tokenizer=None"], lambda c: c.model.tokenizer, None),
        (["--model.lora.r", "4"], lambda c: c.model.lora.r, 4),
        (["--ref.path", "/ref"], lambda c: (c.ref.path, c.ref.dtype), ("/ref", "float32")),
        (["--loss_type", "ipo"], lambda c: c.loss_type, "ipo"),
        (["--train.batch-size", "16"], lambda c: c.train.batch_size, 16),
        (["--seed", "-3"], lambda c: c.seed, -3),
        (["--seed", "1", "--seed", "2"], lambda c: c.seed, 2),
    ],
)
def test_override(override: list[str], get: object, expected: object) -> None:
    assert get(load_config(Algo, None, override)) == expected  # type: ignore[operator]


def test_overrides_win_over_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "optim: {lr: 1.0e-3}\nref: {path: /r}\n")
    cfg = load_config(Algo, path, ["--optim.lr", "5e-7", "--ref", "none"])
    assert cfg.optim.lr == 5e-7 and cfg.ref is None


def test_parse_overrides() -> None:
    pairs = parse_overrides(["--a.b", "1", "--c-d=x=y", "--e"])
    assert pairs[:2] == [("a.b", "1"), ("c_d", "x=y")] and pairs[2][0] == "e"
    with pytest.raises(ConfigError, match=r"^unexpected argument 'lr' \(overrides look like --section.key VALUE\)$"):
        parse_overrides(["lr", "1"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--optim.lrr", "1"], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (["--optimm.lr", "1"], "unknown key 'optimm.lr' (did you mean 'optim.lr'?)"),
        (["--lr", "1"], "unknown key 'lr' (did you mean 'optim.lr'?)"),
        (["--model.lora.alpah", "1"], "unknown key 'model.lora.alpah' (did you mean 'model.lora.alpha'?)"),
        (
            ["--optim.zzz", "1"],
            "unknown key 'optim.zzz' (valid keys: lr, weight_decay, beta1, beta2, eps, max_grad_norm)",
        ),
        (["--optim.lr.x", "1"], "unknown key 'optim.lr.x': 'optim.lr' is a float, not a section"),
    ],
)
def test_unknown_key_names_the_closest(overrides: list[str], message: str) -> None:
    assert error(Algo, None, tuple(overrides)) == message


def test_unknown_yaml_key_names_file_and_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  lrr: 1.0e-5\n")
    assert error(Algo, path) == f"{path}: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--optim.lr", "fast"], "optim.lr: expected float, got 'fast' (str)"),
        (["--train.epochs", "1.5"], "train.epochs: expected int, got '1.5' (str)"),
        (["--model.trust_remote_code", "maybe"], "model.trust_remote_code: expected bool, got 'maybe' (str)"),
        (["--steps", "1,x"], "steps[1]: expected int, got 'x' (str)"),
        (["--tags", "[1]"], "tags[0]: expected str, got 1 (int)"),
        (["--tags", "[oops"], "tags: expected a JSON list, got '[oops' (Expecting value)"),
        (["--loss_type", "hinge"], "loss_type: expected one of 'sigmoid', 'ipo', got 'hinge' (str)"),
        (["--optim.lr"], "optim.lr: missing value (use --optim.lr VALUE)"),
        (
            ["--optim", "1"],
            "optim: expected a section with keys (lr, weight_decay, beta1, beta2, ...), got '1' (str)",
        ),
    ],
)
def test_wrong_type_names_key_type_and_value(overrides: list[str], message: str) -> None:
    assert error(Algo, None, tuple(overrides)) == message


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("train: {batch_size: 2.5}", "train.batch_size: expected int, got 2.5 (float)"),
        ("train: {batch_size: '8'}", "train.batch_size: expected int, got '8' (str)"),
        ("logging: {progress: 'yes'}", "logging.progress: expected bool, got 'yes' (str)"),
        ("logging: {progress: 1}", "logging.progress: expected bool, got 1 (int)"),
        ("optim: {lr: true}", "optim.lr: expected float, got True (bool)"),
        ("model: {path: 123}", "model.path: expected str, got 123 (int)"),
        ("tags: a", "tags: expected list[str], got 'a' (str)"),
        (
            "optim: 1.0e-5",
            "optim: expected a section with keys (lr, weight_decay, beta1, beta2, ...), got 1e-05 (float)",
        ),
        ("optim: {lr: {peak: 1}}", "optim.lr: expected float, got {'peak': 1} (dict)"),
        (
            "model: null",
            "model: expected a section with keys (path, tokenizer, dtype, trust_remote_code, ...), got None (NoneType)",
        ),
        ("sources: [{name: rm, weight: x}]", "sources[0].weight: expected float, got 'x' (str)"),
    ],
)
def test_wrong_type_in_yaml(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = write(tmp_path, yaml_text + "\n")
    assert error(Algo, path) == f"{path}: {message}"


def test_yaml_file_problems(tmp_path: Path) -> None:
    assert error(Algo, tmp_path / "nope.yaml") == f"config file not found: {tmp_path / 'nope.yaml'}"
    path = write(tmp_path, "- 1\n- 2\n")
    assert error(Algo, path) == f"{path}: expected a mapping of sections at the top level, got list"
    path = write(tmp_path, "optim:\n  lr: 1.0\noptim:\n  eps: 1.0\n")
    assert error(Algo, path) == f"{path}:3:1: invalid YAML: duplicate key 'optim'"
    path = write(tmp_path, "optim: {lr: 1\n")
    assert error(Algo, path).startswith(f"{path}:2:1: invalid YAML: ")


def test_sections_and_lists_of_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "ref: {path: /r, lora: {r: 2}}\nsources: [{name: rm, weight: 0.5}, {}]\n")
    cfg = load_config(Algo, path)
    assert cfg.ref is not None and (cfg.ref.path, cfg.ref.lora.r) == ("/r", 2)
    assert cfg.sources == [Source("rm", 0.5), Source()]
    assert load_config(Algo, write(tmp_path, "ref: null\n")).ref is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--train.micro_batch_size", "3"], "train.batch_size: must be a multiple of micro_batch_size (3), got 8"),
        (["--train.mixed_precision", "fp8"], "train.mixed_precision: expected one of 'no', 'bf16', 'fp16', got 'fp8'"),
        (["--schedule.name", "step"], "schedule.name: expected one of 'constant', 'linear', 'cosine', got 'step'"),
        (["--optim.lr", "0"], "optim.lr: must be > 0, got 0.0"),
        (["--model.dtype", "fp16"], "model.dtype: expected one of 'float32', 'bfloat16', 'float16', got 'fp16'"),
        (["--ref.dtype", "int8"], "ref.dtype: expected one of 'float32', 'bfloat16', 'float16', got 'int8'"),
        (["--model.lora.dropout", "1"], "model.lora.dropout: must be in [0, 1), got 1.0"),
        (
            ["--data.truncation_side", "left"],
            "data.truncation_side: expected one of 'keep_end', 'keep_start', got 'left'",
        ),
        (
            ["--data.max_prompt_length", "512"],
            "data.max_prompt_length: must be > 0 and < max_length (512) to leave room for the response, got 512",
        ),
        (
            ["--data.eval", "e.jsonl", "--data.eval_fraction", "0.1"],
            "data.eval_fraction: set either eval or eval_fraction, not both (eval='e.jsonl', eval_fraction=0.1)",
        ),
        (
            ["--logging.trackers", "tensorboard,tb"],
            "logging.trackers[1]: expected one of 'tensorboard', 'wandb', "
            "'comet_ml', 'aim', 'mlflow', 'clearml', 'dvclive', 'swanlab', 'trackio', got 'tb'",
        ),
        (
            ["--checkpoint.resume", "autoo"],
            "checkpoint.resume: expected auto, never or an existing checkpoint directory, got 'autoo'",
        ),
        (["--beta", "0"], "beta: must be > 0, got 0.0"),
        (["--sources", '[{"weight": -1}]'], "sources[0].weight: must be >= 0, got -1.0"),
    ],
)
def test_validate_errors_carry_the_dotted_key(overrides: list[str], message: str) -> None:
    assert error(Algo, None, tuple(overrides)) == message


def test_validate_accepts_good_values(tmp_path: Path) -> None:
    cfg = load_config(
        Algo,
        None,
        ["--train.batch_size", "32", "--train.micro_batch_size", "8", "--checkpoint.resume", str(tmp_path)],
    )
    assert cfg.train.batch_size == 32 and cfg.checkpoint.resume == str(tmp_path)


def test_config_error_is_a_user_value_error() -> None:
    exc = ConfigError("must be > 0", key="optim.lr")
    assert isinstance(exc, UserError) and isinstance(exc, ValueError) and exc.exit_code == 2
    assert str(exc) == "optim.lr: must be > 0" and (exc.key, exc.message) == ("optim.lr", "must be > 0")


def test_save_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        Algo,
        None,
        [
            "--optim.lr=1e-5",
            "--note",
            "yes",  # a string YAML would read as a bool unless quoted
            "--model.path",
            "null",
            "--tags",
            '["1e-5", "on", ""]',
            "--ref.path",
            "/r",
            "--weights",
            '{"a": 0.25}',
            "--sources",
            '[{"name": "x"}]',
            "--loss_type",
            "ipo",
        ],
    )
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.read_text().startswith("beta: 0.1\nloss_type: ipo\n")
    assert load_config(Algo, path) == cfg
    assert to_dict(cfg)["optim"]["lr"] == 1e-5 and to_dict(cfg)["sources"] == [{"name": "x", "weight": 1.0}]


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
    number=st.floats(min_value=1e-12, max_value=1e6, allow_nan=False),
    tags=st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=5), max_size=3),
)
def test_round_trip_any_values(tmp_path_factory: pytest.TempPathFactory, text: str, number: float, tags: list) -> None:
    cfg = Algo(note=text, tags=tags, beta=number)
    path = save_config(cfg, tmp_path_factory.mktemp("rt") / "config.yaml")
    assert load_config(Algo, path) == cfg


def test_field_docs() -> None:
    docs = field_docs(OptimConfig)
    assert docs["lr"] == "Peak learning rate of AdamW."
    assert set(docs) == {"lr", "weight_decay", "beta1", "beta2", "eps", "max_grad_norm"}
    assert field_docs(Source)["weight"] == "Weight of this source\nin the ensemble."
    assert field_docs(Child) == {**field_docs(Source), "extra": "Added by the subclass."}
    assert field_docs(OptimConfig) is docs  # cached


def test_config_help_lists_dotted_fields() -> None:
    text = config_help(Algo)
    assert text.startswith("  --beta float  (default: 0.1)\n      KL coefficient.\n")
    assert "  --loss_type {sigmoid,ipo}  (default: sigmoid)\n      Which preference loss.\n" in text
    assert "\nmodel.lora:  Low-rank adapters (peft).\n  --model.lora.r int  (default: 0)\n" in text
    assert "\nref: (unset by default)  A separate reference model; unset: the initial policy.\n" in text
    assert "  --ref.tokenizer str | None  (default: null)\n" in text
    assert "  --model.lora.target_modules list[str]  (default: [all-linear])\n" in text


def test_config_markdown() -> None:
    text = config_markdown(OptimConfig, "optim.")
    assert text.startswith("| key | type | default | description |\n|---|---|---|---|\n")
    assert "| `optim.lr` | `float` | `1e-05` | Peak learning rate of AdamW. |" in text
    assert "| `model.tokenizer` | `str \\| None` | `null` |" in config_markdown(ModelConfig, "model.")


def test_the_section_tables_of_docs_config_md_match_the_dataclasses() -> None:
    """docs/config.md shows every shared section as `config_markdown` renders it: a field added or re-documented
    without regenerating the page (`python docs/make_config_tables.py`) fails here."""
    from pathlib import Path

    from rlhf.config import CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, OptimConfig, ScheduleConfig
    from rlhf.rollout.config import KLConfig, OnlineEvalConfig, RewardConfig, RolloutConfig

    page = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    sections = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
                "train": TrainConfig, "logging": LoggingConfig, "checkpoint": CheckpointConfig,
                "rollout": RolloutConfig, "reward": RewardConfig, "kl": KLConfig, "eval": OnlineEvalConfig}  # fmt: skip
    for name, cls in sections.items():
        assert f"### `{name}` ({cls.__name__})\n\n" + config_markdown(cls, f"{name}.") in page, name


@pytest.mark.parametrize(
    ("algorithm", "key", "ours"),
    [
        ("sft", "per_device_train_batch_size", "train.micro_batch_size"),
        ("ppo", "beta", "kl.coef"),
        ("grpo", "num_generations", "group_size"),
        ("grpo", "loss_type", "loss_aggregation"),
        ("dpo", "num_train_epochs", "train.epochs"),
    ],  # fmt: skip
)
def test_trl_argument_names_point_to_ours(algorithm: str, key: str, ours: str) -> None:
    from rlhf.cli import train_config, trainer_module

    with pytest.raises(ConfigError, match=f"unknown key '{key}' \\(that is TRL's name; here it is '{ours}'\\)"):
        train_config(algorithm, trainer_module(algorithm), None, [f"--{key}", "1"])
