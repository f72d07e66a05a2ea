from dataclasses import dataclass
from typing import Literal

import pytest

from dlmdistill.config import ConfigError, field, format_help, load_config, parse_overrides


@dataclass
class Inner:
    lr: float = field(1e-3, help="learning rate")
    steps: list[int] = field(default_factory=lambda: [8], help="steps")
    mode: Literal["a", "b"] = field("a", help="mode")
    maybe: int | None = field(None, help="optional")


@dataclass
class Other:
    flag: bool = field(False, help="a flag")
    lr: float = field(0.5, help="same leaf name as Inner.lr")


@dataclass
class Root:
    inner: Inner = field(default_factory=Inner, help="inner section")
    other: Other = field(default_factory=Other, help="other section")
    name: str = field("x", help="a name")


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  lr: 2e-4\n  steps: [8, 16]\nname: run\n")
    cfg = load_config(Root, f, ["--inner.mode", "b", "--steps", "8", "16", "32", "--flag", "--maybe=3"])
    assert cfg.inner.lr == 2e-4 and cfg.inner.steps == [8, 16, 32] and cfg.inner.mode == "b"
    assert cfg.other.flag is True and cfg.inner.maybe == 3 and cfg.name == "run"


def test_unknown_yaml_key_names_file_and_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml\.inner: unknown key 'lrr'.*Did you mean 'lr'"):
        load_config(Root, f)


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"inner\.mode: 'c' is not one of"):
        load_config(Root, None, ["--inner.mode", "c"])
    with pytest.raises(ConfigError, match=r"inner\.lr: expected a number"):
        load_config(Root, None, ["--inner.lr", "fast"])
    with pytest.raises(ConfigError, match="ambiguous"):
        parse_overrides(Root, ["--lr", "1"])
    with pytest.raises(ConfigError, match="unknown option --nmae"):
        parse_overrides(Root, ["--nmae", "1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Root, tmp_path / "nope.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("inner: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(Root, f)


def test_help_lists_every_option():
    text = format_help(Root)
    for key in ("--inner.lr", "--inner.steps", "--other.flag", "--name", "learning rate"):
        assert key in text


def test_real_run_configs_load():
    from dlmdistill.methods import METHODS, get_method

    for name in METHODS:
        cls, _ = get_method(name)
        needs_teacher = name in ("kd", "seqkd")  # every section is checked when the configuration is built
        cfg = load_config(cls, None, ["--learning_rate", "1e-4", *(["--teacher", "runs/t"] if needs_teacher else [])])
        assert cfg.training.learning_rate == 1e-4
        if needs_teacher:
            with pytest.raises(ConfigError, match="method.teacher is required"):
                load_config(cls, None, ["--learning_rate", "1e-4"])


@dataclass
class WithDefaults:
    inner: Inner = field(default_factory=lambda: Inner(lr=0.25, mode="b"), help="section with custom defaults")


def test_partial_section_keeps_the_parents_defaults():
    cfg = load_config(WithDefaults, None, ["--inner.maybe", "2"])
    assert cfg.inner.lr == 0.25 and cfg.inner.mode == "b" and cfg.inner.maybe == 2


def test_whole_section_as_a_mapping_on_the_command_line():
    cfg = load_config(WithDefaults, None, ["--inner", "{maybe: 4, steps: [1, 2]}"])
    assert cfg.inner.maybe == 4 and cfg.inner.steps == [1, 2] and cfg.inner.lr == 0.25
    with pytest.raises(ConfigError, match="takes a mapping"):
        load_config(WithDefaults, None, ["--inner", "3"])
