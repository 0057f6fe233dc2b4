"""compress.config: dataclass schemas, YAML values, key=value overrides, and loud errors."""

from __future__ import annotations  # the schemas below must work with string annotations

import dataclasses
import enum
import json
from typing import Literal, Optional

import pytest

from compress import config as cfg
from compress.config import ConfigError


class Dtype(enum.Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int | None = None
    method: Literal["greedy", "sample"] = "sample"

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class Lora:
    rank: int = 8
    targets: tuple[str, ...] = ("q", "v")


@dataclasses.dataclass(frozen=True)
class Job:
    name: str = "job"
    steps: int = 10
    lr: float = 1e-3
    use_cache: bool = True
    mesh: tuple[int, ...] = (1,)
    shape: tuple[int, str] = (2, "x")
    layers: list[int] = dataclasses.field(default_factory=list)
    dtype: Dtype = Dtype.FLOAT32
    sampling: Sampling = Sampling(temperature=0.5)  # differs from Sampling's own default on purpose
    lora: Lora | None = None
    seed: Optional[int] = 0


@dataclasses.dataclass(frozen=True)
class Model:
    path: str  # required
    layers: int = 2


@dataclasses.dataclass(frozen=True)
class Train:
    model: Model  # required section
    steps: int = 1


def write(tmp_path, text: str, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- values


def test_string_annotations_are_resolved():
    assert isinstance(Job.__annotations__["steps"], str)
    assert cfg.load(Job, overrides=["steps=3"]).steps == 3


def test_defaults_then_file_then_overrides_in_order(tmp_path):
    assert cfg.load(Job) == Job()
    path = write(tmp_path, "name: from-file\nsteps: 20\nsampling:\n  top_k: 40\n")
    job = cfg.load(Job, path, ["steps=30", "sampling.temperature=0.7", "steps=40"])
    assert job.name == "from-file"
    assert job.steps == 40  # the last override wins
    assert job.sampling == Sampling(temperature=0.7, top_k=40)


def test_partial_section_keeps_the_fields_default_instance(tmp_path):
    job = cfg.load(Job, write(tmp_path, "sampling:\n  top_k: 5\n"))
    assert job.sampling == Sampling(temperature=0.5, top_k=5)  # 0.5 from Job's default, not Sampling's 1.0
    assert cfg.load(Job, overrides=["sampling.top_k=5"]).sampling.temperature == 0.5


def test_int_and_float(tmp_path):
    job = cfg.load(Job, write(tmp_path, "lr: 1\nsteps: 0x10\n"))
    assert job.lr == 1.0 and isinstance(job.lr, float)
    assert job.steps == 16
    # PyYAML alone reads 1e-4 as a string (YAML 1.1); configs mean a float.
    assert cfg.load(Job, write(tmp_path, "lr: 1e-4\n")).lr == 1e-4
    assert cfg.load(Job, overrides=["lr=3e-4"]).lr == 3e-4
    assert cfg.load(Job, overrides=["lr=2"]).lr == 2.0


def test_bool_is_not_an_int_or_float(tmp_path):
    msg = error(cfg.load, Job, write(tmp_path, "steps: true\n"))
    assert "key 'steps'" in msg and "expected int" in msg and "True" in msg
    assert "expected int" in error(cfg.load, Job, overrides=["steps=true"])
    assert "expected float" in error(cfg.load, Job, write(tmp_path, "lr: false\n"))


def test_numeric_strings_count_only_in_overrides(tmp_path):
    path = write(tmp_path, 'steps: "3"\n')
    msg = error(cfg.load, Job, path)
    assert path in msg and "key 'steps'" in msg and "expected int" in msg and "'3'" in msg
    assert cfg.load(Job, overrides=["steps=3"]).steps == 3
    assert "expected int, got 2.5" in error(cfg.load, Job, overrides=["steps=2.5"])


@pytest.mark.parametrize(
    "text, value",
    [("true", True), ("TRUE", True), ("yes", True), ("1", True), ("false", False), ("No", False), ("0", False)],
)
def test_bool_words_in_overrides(text, value):
    assert cfg.load(Job, overrides=[f"use_cache={text}"]).use_cache is value


def test_bool_in_yaml(tmp_path):
    assert cfg.load(Job, write(tmp_path, "use_cache: false\n")).use_cache is False
    assert "expected bool" in error(cfg.load, Job, write(tmp_path, "use_cache: 1\n"))
    assert "expected bool, got 'maybe'" in error(cfg.load, Job, overrides=["use_cache=maybe"])


@pytest.mark.parametrize("word", ["null", "none", "None", "~", "NULL"])
def test_optional_accepts_none_words_in_overrides(word):
    assert cfg.load(Job, overrides=[f"seed={word}"]).seed is None
    assert cfg.load(Job, overrides=["sampling.top_k=5", f"sampling.top_k={word}"]).sampling.top_k is None


def test_optional_in_yaml(tmp_path):
    assert cfg.load(Job, write(tmp_path, "seed: null\n")).seed is None
    assert cfg.load(Job, write(tmp_path, "seed: ~\nsampling: {top_k: 7}\n")).sampling.top_k == 7
    assert "expected int" in error(cfg.load, Job, write(tmp_path, "seed: abc\n"))


def test_str_overrides_take_text_as_typed_or_unquoted():
    assert cfg.load(Job, overrides=["name=123"]).name == "123"
    assert cfg.load(Job, overrides=['name="quoted"']).name == "quoted"
    assert cfg.load(Job, overrides=["name=a: b=c"]).name == "a: b=c"
    assert cfg.load(Job, overrides=["name="]).name == ""


def test_str_fields_in_yaml_must_be_strings(tmp_path):
    msg = error(cfg.load, Job, write(tmp_path, "name: 123\n"))
    assert "key 'name'" in msg and "expected str" in msg and "123" in msg


def test_literal_lists_allowed_values(tmp_path):
    assert cfg.load(Job, overrides=["sampling.method=greedy"]).sampling.method == "greedy"
    msg = error(cfg.load, Job, overrides=["sampling.method=beam"])
    assert "key 'sampling.method'" in msg and "'greedy', 'sample'" in msg and "'beam'" in msg
    assert "'greedy', 'sample'" in error(cfg.load, Job, write(tmp_path, "sampling:\n  method: true\n"))


def test_tuples_and_lists(tmp_path):
    job = cfg.load(Job, overrides=["mesh=[1,2,4]", "layers=[3, 5]", "shape=[4, y]"])
    assert job.mesh == (1, 2, 4) and isinstance(job.mesh, tuple)
    assert job.layers == [3, 5] and isinstance(job.layers, list)
    assert job.shape == (4, "y")
    assert cfg.load(Job, write(tmp_path, "mesh: [8]\nlora:\n  targets: [q, k, v]\n")).lora.targets == ("q", "k", "v")
    assert "key 'mesh[1]'" in error(cfg.load, Job, overrides=["mesh=[1, two]"])
    assert "expected tuple[int, ...], got 4" in error(cfg.load, Job, overrides=["mesh=4"])
    assert "2 items" in error(cfg.load, Job, overrides=["shape=[1, a, b]"])
    assert "cannot read" in error(cfg.load, Job, overrides=["mesh=[1, 2"])


def test_enum_by_name_or_value(tmp_path):
    assert cfg.load(Job, overrides=["dtype=BFLOAT16"]).dtype is Dtype.BFLOAT16
    assert cfg.load(Job, overrides=["dtype=bfloat16"]).dtype is Dtype.BFLOAT16
    assert cfg.load(Job, write(tmp_path, "dtype: bfloat16\n")).dtype is Dtype.BFLOAT16
    assert cfg.load(Job, write(tmp_path, "dtype: BFLOAT16\n")).dtype is Dtype.BFLOAT16
    msg = error(cfg.load, Job, overrides=["dtype=fp8"])
    assert "key 'dtype'" in msg and "FLOAT32, BFLOAT16" in msg and "'fp8'" in msg


def test_optional_section_is_enabled_by_its_keys_and_disabled_by_null(tmp_path):
    assert cfg.load(Job, overrides=["lora.rank=4"]).lora == Lora(rank=4)
    assert cfg.load(Job, write(tmp_path, "lora: {}\n")).lora == Lora()
    assert cfg.load(Job, write(tmp_path, "lora: {rank: 2}\n"), ["lora=null"]).lora is None
    assert "is a section" in error(cfg.load, Job, overrides=["sampling=3"])
    assert "not a section" in error(cfg.load, Job, overrides=["steps.x=3"])
    assert "expected a Sampling section (a mapping), got 3" in error(cfg.load, Job, write(tmp_path, "sampling: 3\n"))


# ----------------------------------------------------------------------------- errors


def test_unknown_key_in_file_names_key_file_and_valid_keys(tmp_path):
    path = write(tmp_path, "stepz: 3\n")
    with pytest.raises(ConfigError) as info:
        cfg.load(Job, path)
    msg = str(info.value)
    assert info.value.key == "stepz" and info.value.source == path
    assert path in msg and "did you mean 'steps'" in msg
    assert "name, steps, lr, use_cache" in msg


def test_unknown_nested_key(tmp_path):
    msg = error(cfg.load, Job, write(tmp_path, "sampling:\n  temprature: 0.1\n"))
    assert "key 'sampling.temprature'" in msg and "did you mean 'sampling.temperature'" in msg
    assert "temperature, top_k, method" in msg
    msg = error(cfg.load, Job, overrides=["sampling.topk=3"])
    assert "override 'sampling.topk=3'" in msg and "'sampling.top_k'" in msg
    assert "valid keys here: name" in error(cfg.load, Job, overrides=["zzz=1"])  # no close match, still listed


def test_malformed_overrides():
    assert "override 'steps'" in error(cfg.load, Job, overrides=["steps"])
    assert "expected key=value" in error(cfg.load, Job, overrides=["=3"])


def test_file_errors(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert missing in error(cfg.load, Job, missing) and "not found" in error(cfg.load, Job, missing)
    path = write(tmp_path, "- a\n- b\n")
    assert path in (msg := error(cfg.load, Job, path)) and "mapping" in msg and "list" in msg
    path = write(tmp_path, "name: a\nsteps: [1\nlr: 2\n")
    msg = error(cfg.load, Job, path)
    assert path in msg and "invalid YAML" in msg and "line 3" in msg
    assert cfg.load(Job, write(tmp_path, "# only a comment\n")) == Job()


def test_required_fields(tmp_path):
    msg = error(cfg.load, Train)
    assert "missing required key(s) 'model'" in msg
    msg = error(cfg.load, Train, write(tmp_path, "model:\n  layers: 3\n"))
    assert "'model.path'" in msg
    train = cfg.load(Train, overrides=["model.path=/ckpt"])
    assert train == Train(model=Model(path="/ckpt"))
    assert "'path'" in error(cfg.from_dict, Model, {})


def test_post_init_errors_name_their_source(tmp_path):
    path = write(tmp_path, "sampling:\n  temperature: -1\n")
    with pytest.raises(ConfigError) as info:
        cfg.load(Job, path)
    assert info.value.key == "sampling" and path in str(info.value) and "temperature must be >= 0" in str(info.value)
    msg = error(cfg.load, Job, overrides=["sampling.temperature=-2"])
    assert "override 'sampling.temperature=-2'" in msg and "got -2.0" in msg
    assert "<my dict>" in error(cfg.from_dict, Job, {"sampling": {"temperature": -1}}, source="<my dict>")


def test_unsupported_field_type_is_a_schema_error():
    @dataclasses.dataclass(frozen=True)
    class Bad:
        table: set = dataclasses.field(default_factory=set)

    with pytest.raises(TypeError, match="not supported"):
        cfg.from_dict(Bad, {"table": [1]})


# ----------------------------------------------------------------------------- conversions


def test_from_dict_and_apply_overrides():
    data = {"steps": 5, "sampling": {"top_k": 3}}
    job = cfg.from_dict(Job, data)
    assert data == {"steps": 5, "sampling": {"top_k": 3}}  # input untouched
    assert (job.steps, job.sampling.top_k, job.sampling.temperature) == (5, 3, 0.5)
    changed = cfg.apply_overrides(job, ["steps=6", "dtype=BFLOAT16", "lora.rank=1"])
    assert changed == dataclasses.replace(job, steps=6, dtype=Dtype.BFLOAT16, lora=Lora(rank=1))
    assert job.steps == 5
    assert cfg.apply_overrides(job, []) == job
    assert "override 'steps=x'" in error(cfg.apply_overrides, job, ["steps=x"])
    assert "temperature must be" in error(cfg.apply_overrides, job, ["sampling.temperature=-1"])


def test_to_dict_is_plain():
    job = Job(mesh=(2, 4), lora=Lora(), dtype=Dtype.BFLOAT16)
    data = cfg.to_dict(job)
    assert data["mesh"] == [2, 4] and data["dtype"] == "BFLOAT16" and data["lora"] == {"rank": 8, "targets": ["q", "v"]}
    assert json.loads(json.dumps(data)) == data
    assert cfg.from_dict(Job, data) == job
    with pytest.raises(TypeError):
        cfg.to_dict({"not": "a dataclass"})


@pytest.mark.parametrize("name", ["job", "yes", "null", "1e3", "3", "a: b", "# x", "ünï", "line\nbreak"])
def test_dump_load_round_trip(tmp_path, name):
    job = Job(
        name=name, steps=7, lr=1e-5, use_cache=False, mesh=(1, 2, 4), shape=(3, "z"), layers=[1, 2],
        dtype=Dtype.BFLOAT16, sampling=Sampling(top_k=9, method="greedy"), lora=Lora(rank=2), seed=None,
    )
    text = cfg.dump(job)
    assert cfg.load(Job, write(tmp_path, text)) == job
    assert cfg.load(Job, write(tmp_path, cfg.dump(Job()))) == Job()


@dataclasses.dataclass(frozen=True)
class _WithDicts:
    rules: dict[str, str | None] = dataclasses.field(default_factory=lambda: {"embed": "fsdp", "mlp": "tensor"})
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)


def test_dict_fields_update_their_default_entries_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rules:\n  mlp: null\nsizes:\n  layers: 4\n")
    loaded = cfg.load(_WithDicts, path, ["rules.vocab=tensor", "sizes.width=64"])
    assert loaded.rules == {"embed": "fsdp", "mlp": None, "vocab": "tensor"}
    assert loaded.sizes == {"layers": 4, "width": 64}
    assert cfg.from_dict(_WithDicts, cfg.to_dict(loaded)) == loaded  # dump and read back
    with pytest.raises(cfg.ConfigError, match=r"sizes\.width.*expected int"):
        cfg.load(_WithDicts, None, ["sizes.width=wide"])


@pytest.mark.parametrize("text", ["del\x7f", "nel\x85 end", "c1\x9b", "nonchar\uffff", "caf\udce9", "emoji 😀",
                                  "a\nb\tc", "hello: world", "it's \"q\"", "  lead", "\\u0041", "yes", "1", "null"])
def test_command_line_words_reach_the_config_exactly(text):
    # A flag's or a bare word's text, as argparse gives it (a non-UTF-8 byte of argv as a lone surrogate):
    # JSON's spelling of it was read back by YAML with its quotes kept, or NEL folded to a space.
    import argparse

    parser = argparse.ArgumentParser()
    cfg.add_config_arguments(parser, Job, positional="name")
    assert cfg.config_from_args(parser.parse_args([text])).name == text
    flags = cfg.add_config_arguments(argparse.ArgumentParser(), Lora)
    flags.flag("--targets", key="targets", nargs="+")
    assert cfg.config_from_args(flags.parser.parse_args(["--targets", text, "v"])).targets == (text, "v")
