"""Config tree: round trips, overrides, and every kind of bad input (exit code 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from typer.testing import CliRunner

from stars.cli import app
from stars.config import (
    ConfigError,
    RunConfig,
    TeacherTrainConfig,
    WeightSchedule,
    apply_overrides,
    dump_yaml,
    load_config,
    load_teacher_config,
)

runner = CliRunner()
_ROOT = Path(__file__).parent.parent
CONFIGS = sorted(
    [*(_ROOT / "configs").rglob("*.yaml"), *(_ROOT / "benchmarks" / "paper_table").glob("*.yaml")]
)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path: Path) -> None:
    if "train" in (yaml.safe_load(path.read_text()) or {}):
        cfg: RunConfig | TeacherTrainConfig = load_teacher_config(path)
    else:
        cfg = load_config(path)
    assert cfg.model_dump() == type(cfg).model_validate(yaml.safe_load(dump_yaml(cfg))).model_dump()


def test_shipped_configs_exist() -> None:
    assert len(CONFIGS) >= 1


# ----------------------------------------------------------------------------- round trip

synthesis_st = st.one_of(
    st.fixed_dictionaries(
        {
            "kind": st.just("fast"),
            "g_steps": st.integers(1, 50),
            "lr_g": st.floats(1e-5, 1.0),
            "adv_weight": st.floats(0, 10),
            "meta": st.booleans(),
        }
    ),
    st.fixed_dictionaries(
        {
            "kind": st.just("deepinversion"),
            "iterations": st.integers(1, 5000),
            "jitter": st.integers(0, 4),
        }
    ),
    st.fixed_dictionaries({"kind": st.just("dafl"), "ie_weight": st.floats(0, 20)}),
    st.fixed_dictionaries({"kind": st.just("dfad"), "nz": st.integers(1, 512)}),
)
run_st = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31),
        "precision": st.sampled_from(["fp32", "bf16", "fp16"]),
        "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:1"]),
        "student": st.fixed_dictionaries(
            {
                "T": st.integers(1, 64),
                "arch": st.sampled_from(["spiking_resnet18", "spiking_tiny", "spiking_vgg11"]),
                "neuron": st.fixed_dictionaries(
                    {
                        "kind": st.sampled_from(["lif", "if", "plif"]),
                        "tau": st.floats(1.01, 100),
                        "v_reset": st.one_of(st.none(), st.floats(-1, 0)),
                        "surrogate": st.sampled_from(["atan", "sigmoid"]),
                    }
                ),
            }
        ),
        "synthesis": synthesis_st,
        "stars": st.fixed_dictionaries(
            {
                "rca": st.fixed_dictionaries(
                    {
                        "weight": st.floats(0, 10),
                        "role": st.sampled_from(["adversarial", "align"]),
                        "features": st.sampled_from(["penultimate", "logits"]),
                    }
                ),
                "tar": st.fixed_dictionaries(
                    {
                        "weight": st.floats(0, 100),
                        "kappas": st.lists(st.floats(0.1, 4), min_size=1, max_size=4),
                        "source": st.sampled_from(
                            ["gaussian-bn", "laplace-bn", "quantile", "student-vth"]
                        ),
                    }
                ),
            }
        ),
        "data": st.one_of(
            st.fixed_dictionaries({"kind": st.sampled_from(["cifar10", "cifar100"])}),
            st.fixed_dictionaries(
                {
                    "kind": st.just("imagefolder"),
                    "root": st.just("/data/tiny"),
                    "num_classes": st.integers(1, 1000),
                    "image_size": st.sampled_from([32, 64]),
                }
            ),
        ),
    }
)


@examples(60)
@given(tree=run_st)
def test_valid_config_round_trips_through_yaml(tree: dict[str, object]) -> None:
    cfg = RunConfig.model_validate(tree)
    again = RunConfig.model_validate(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_config_is_frozen() -> None:
    cfg = load_config(None)
    with pytest.raises(Exception, match="frozen"):
        cfg.seed = 3  # type: ignore[misc]


# ----------------------------------------------------------------------------- overrides


def test_override_coerces_types(tmp_path: Path) -> None:
    cfg = load_config(None, ["student.T=6", "stars.tar.kappas=[1, 1.5]", "teacher.checkpoint=null"])
    assert cfg.student.T == 6
    assert isinstance(cfg.student.T, int)
    assert cfg.stars.tar.kappas == (1.0, 1.5)
    assert cfg.teacher.checkpoint is None


def test_override_switches_variant() -> None:
    cfg = load_config(None, ["synthesis.kind=deepinversion", "synthesis.iterations=7"])
    assert cfg.synthesis.kind == "deepinversion"
    assert cfg.synthesis.iterations == 7


def test_overrides_apply_in_order_on_a_copy() -> None:
    tree = {"student": {"T": 2}}
    out = apply_overrides(tree, ["student.T=3", "student.T=5"])
    assert out == {"student": {"T": 5}}
    assert tree == {"student": {"T": 2}}


# ----------------------------------------------------------------------------- bad input


BAD_CASES: list[tuple[str, list[str], str]] = [
    ("student:\n  T: 0\n", [], "student.T"),
    ("student:\n  T: four\n", [], "student.T"),
    ("stars:\n  rca:\n    weight: -1\n", [], "stars.rca.weight"),
    ("stars:\n  tar:\n    kappas: [1, 0]\n", [], "stars.tar.kappas.1"),
    ("stars:\n  tar:\n    kappas: [-2]\n", [], "stars.tar.kappas.0"),
    ("student:\n  bogus: 1\n", [], "student.bogus"),
    ("synthesis:\n  kind: gan\n", [], "synthesis"),
    ("synthesis:\n  kind: fast\n  iterations: 3\n", [], "synthesis.iterations"),
    ("data:\n  kind: mnist\n", [], "data"),
    ("", ["student.T=-1"], "student.T"),
    ("", ["distill.optimizer.lr=0"], "distill.optimizer.lr"),
    ("", ["student.neuron.v_reset=2"], "student.neuron"),
    ("", ["student.encoder_v_threshold=0"], "student.encoder_v_threshold"),
    ("", ["student.neuron.v_reset=0.3", "student.encoder_v_threshold=0.2"], "student"),
    ("", ["device=tpu"], "device"),
    ("", ["channels_last=student"], "channels_last"),
    ("", ["stars.rca.recalibrate_every=4"], "stars.rca"),
    (
        "",
        ["stars.rca.grad_ratio=0.2", "stars.rca.recalibrate_every=0"],
        "stars.rca.recalibrate_every",
    ),
    ("", ["stars.spike_tar.stages=[0]", "stars.spike_tar.pairs=[[0, 1]]"], "stars.spike_tar"),
    ("", ["stars.spike_tar.granularity=batch"], "stars.spike_tar"),
    ("", ["stars.spike_tar.target=gaussian"], "stars.spike_tar"),
    ("", ["stars.spike_tar.tail_mass=1.5"], "stars.spike_tar.tail_mass"),
    ("", ["stars.spike_tar.role=maximize"], "stars.spike_tar.role"),
    ("", ["stars.schedule.kind=linear"], "stars.schedule"),
    ("", ["stars.schedule.end_epoch=0"], "stars.schedule.end_epoch"),
    ("", ["stars.tar.layers=first"], "stars.tar.layers"),
]


@pytest.mark.parametrize(("text", "sets", "field"), BAD_CASES)
def test_bad_config_exits_2_with_field_path(
    tmp_path: Path, text: str, sets: list[str], field: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(path, sets)
    args = ["config", "validate", str(path)]
    for s in sets:
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert field in result.output
    assert "Traceback" not in result.output


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "student:\n  T: 4\n  neuron: [unclosed\nseed: 1\n")
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 2
    assert "YAML syntax error" in result.output
    assert "line" in result.output


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "not found" in result.output


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "validate", str(_write(tmp_path, "- 1\n- 2\n"))])
    assert result.exit_code == 2
    assert "mapping" in result.output


def test_bad_override_syntax_exits_2(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    result = runner.invoke(app, ["config", "validate", str(path), "--set", "student.T"])
    assert result.exit_code == 2
    assert "KEY.PATH=VALUE" in result.output


def test_override_into_a_value_exits_2(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    result = runner.invoke(app, ["config", "validate", str(path), "--set", "seed.x=1"])
    assert result.exit_code == 2
    assert "seed" in result.output


def test_error_message_shows_given_value_and_allowed(tmp_path: Path) -> None:
    path = _write(tmp_path, "synthesis:\n  kind: gan\nprecision: fp8\n")
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 2
    assert "'gan'" in result.output
    assert "fast" in result.output  # an allowed kind
    assert "fp8" in result.output
    assert "bf16" in result.output


# ----------------------------------------------------------------------------- CLI shell


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("version", "config", "train-teacher"):
        assert cmd in result.output


def test_schema_is_json_with_sections() -> None:
    import json

    result = runner.invoke(app, ["config", "schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    for section in ("data", "teacher", "student", "synthesis", "stars", "distill", "evaluation"):
        assert section in schema["properties"]


def test_show_renders_resolved_config(tmp_path: Path) -> None:
    path = _write(tmp_path, "student:\n  T: 3\n")
    result = runner.invoke(app, ["config", "show", str(path), "--set", "seed=9"])
    assert result.exit_code == 0
    assert "'T': 3" in result.output
    assert "'seed': 9" in result.output


def test_version() -> None:
    from stars import __version__

    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert __version__ in result.output


@examples(200)
@given(
    kind=st.sampled_from(["constant", "step", "linear", "cosine"]),
    end=st.integers(1, 200),
    epoch=st.integers(0, 400),
)
def test_weight_schedule_is_a_non_increasing_factor(kind: str, end: int, epoch: int) -> None:
    """In [0, 1], 1 at epoch 0, non-increasing, and 0 from ``end_epoch`` on (except
    ``constant``, always 1)."""
    sched = WeightSchedule(kind=kind, end_epoch=None if kind == "constant" else end)
    f = sched.factor(epoch)
    assert 0.0 <= f <= 1.0
    assert sched.factor(0) == 1.0
    assert sched.factor(epoch + 1) <= f + 1e-15
    if kind != "constant" and epoch >= end:
        assert f == pytest.approx(0.0, abs=1e-15)
    if kind == "constant":
        assert f == 1.0
