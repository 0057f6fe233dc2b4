"""`press distill` end to end on tiny models: a student cut from the teacher (layers and widths) moves
toward the teacher's distribution, hidden-state and attention transfer train through a projection
across widths, the loss inside the step is the loss of compress/distill/losses.py on the teacher's
outputs (online, or its top-k as a cache stores them), and bad settings are refused before work."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import config as cfg
from compress.data.pipeline import DataConfig, train_batches
from compress.distill import losses
from compress.distill.job import DistillConfig, KDLossConfig, distill, kd_loss, make_student
from compress.distill.pruning import calibration_windows
from compress.distill.students import select_layers
from compress.errors import InputError
from compress.models import decoder
from compress.pretrained import load_decoder
from compress.train.metrics import read_metrics
from tests.tiny_decoder import export_tiny_decoder

SHORT = ["data.sources=[pydoc]", "data.seq_len=32", "data.batch_size=8", "optimizer.warmup_steps=2",
         "save_every=0", "log_every=1", "eval_every=0", "progress=false"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random teacher on disk (3 layers, 4 heads in 2 groups), with SmolLM2's tokenizer."""
    return export_tiny_decoder(str(tmp_path_factory.mktemp("teacher")), num_layers=3, mlp_dim=128, seed=3)


def _config(teacher, out, *overrides) -> DistillConfig:
    return cfg.load(DistillConfig, None, [f"teacher.name={teacher}", f"out={out}", *SHORT, *overrides])


def _kl_to_teacher(teacher, student_config, student_params, tokens) -> float:
    t = load_decoder(teacher, with_tokenizer=False)
    p = jax.nn.log_softmax(decoder.forward(t.params, tokens, t.config).logits)
    q = jax.nn.log_softmax(decoder.forward(student_params, tokens, student_config).logits)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1)))


def test_a_pruned_student_distils_toward_its_teacher_and_exports(teacher, tmp_path):
    config = _config(teacher, tmp_path / "run", "steps=16", "optimizer.total_steps=16", "optimizer.learning_rate=1e-2",
                     "student.layers=[0,2]", "student.mlp_dim=64", "student.num_heads=2",
                     "student.calibration_windows=4", "student.calibration_seq_len=32", "loss.temperature=1.0")
    t = load_decoder(teacher)
    before_config, before_params, kept = make_student(config.student, t.config, t.params, t.tokenizer, log=print)
    assert kept == (0, 2) and (before_config.num_layers, before_config.mlp_dim, before_config.num_heads,
                               before_config.num_kv_heads) == (2, 64, 2, 1)
    tokens = _batch(t.tokenizer, seq_len=32, rows=4, seed=7)["inputs"]  # text in another order than training's
    before = _kl_to_teacher(teacher, before_config, before_params, tokens)

    result = distill(config)
    assert result.stopped == "done" and result.steps == 16
    student = load_decoder(result.exported, with_tokenizer=False)
    assert (student.config.num_layers, student.config.mlp_dim, student.config.num_heads) == (2, 64, 2)
    after = _kl_to_teacher(teacher, student.config, student.params, tokens)
    assert after < 0.6 * before, (before, after)
    metrics = read_metrics(str(tmp_path / "run"))
    assert {"kd", "ce", "agreement", "tokens"} <= set(metrics[16])
    assert metrics[16]["kd"] < metrics[1]["kd"]
    # the teacher is untouched by the donated steps (the student's leaves were copies)
    assert np.array_equal(np.asarray(load_decoder(teacher, with_tokenizer=False).params["embed"]),
                          np.asarray(t.params["embed"]))


def test_a_student_of_num_layers_keeps_the_greedy_choice_made_on_the_full_width_teacher(teacher, tmp_path):
    config = _config(teacher, tmp_path / "run", "student.num_layers=2", "student.layer_windows=3",
                     "student.mlp_dim=64", "student.calibration_windows=4", "student.calibration_seq_len=32")
    t = load_decoder(teacher)
    student, params, kept = make_student(config.student, t.config, t.params, t.tokenizer, log=print)
    windows = calibration_windows(t.tokenizer, 3, 32)
    assert kept == select_layers(t.config, t.params, windows, keep=2)[0]
    assert (student.num_layers, student.mlp_dim) == (2, 64)
    np.testing.assert_array_equal(params["layers"]["attn_norm"], np.asarray(t.params["layers"]["attn_norm"])[list(kept)])


def test_hidden_state_and_attention_transfer_train_a_narrower_student_through_a_projection(teacher, tmp_path):
    config = _config(teacher, tmp_path / "run", "steps=10", "optimizer.total_steps=10", "optimizer.learning_rate=1e-2",
                     "student.init=random",
                     "student.model_overrides={embed_dim: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, mlp_dim: 64}",
                     "loss.hidden_weight=1.0", "loss.attention_weight=1.0", "loss.hidden_loss=cosine")
    result = distill(config)
    metrics = read_metrics(str(tmp_path / "run"))
    assert metrics[10]["hidden"] < metrics[1]["hidden"] and np.isfinite(metrics[10]["attention"])
    student = load_decoder(result.exported, with_tokenizer=False)  # the projection is not part of the export
    assert student.config.embed_dim == 32 and "kd_projection" not in student.params


def _batch(tokenizer, seq_len=16, rows=2, seed=0):
    data = DataConfig(sources=("pydoc",), seq_len=seq_len, batch_size=rows, seed=seed)
    batches = iter(train_batches(data, tokenizer))
    try:
        return {k: jnp.asarray(v) for k, v in next(batches).items()}
    finally:
        batches.close()


@pytest.mark.parametrize("term", ["hidden", "attention"])
def test_each_transfer_term_alone_moves_the_student_toward_the_teacher_on_a_fixed_batch(teacher, term):
    import optax

    t = load_decoder(teacher)
    student_config = dataclasses.replace(t.config, num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=1,
                                         mlp_dim=64)
    params = {**decoder.init_params(student_config, jax.random.key(1), scale=0.1),
              "kd_projection": jax.random.normal(jax.random.key(2), (2, 32, 64)) / 32**0.5}
    kd = KDLossConfig(hidden_weight=1.0, attention_weight=1.0)
    loss_fn = kd_loss(student_config, t.config, kd, hidden_pairs=((1, 2), (2, 3)), attention_pairs=((1, 2),))
    batch = _batch(t.tokenizer)
    objective = jax.jit(lambda p: loss_fn(p, batch, None, t.params)[1][term])
    optimizer = optax.adam(1e-2)
    state = optimizer.init(params)
    first = float(objective(params))
    for _ in range(30):
        updates, state = optimizer.update(jax.grad(objective)(params), state)
        params = optax.apply_updates(params, updates)
    assert float(objective(params)) < 0.5 * first


def test_the_step_loss_is_the_distillation_loss_of_the_teacher_online_or_from_its_cached_top_k(teacher):
    t = load_decoder(teacher)
    student_config = dataclasses.replace(t.config, num_layers=1)
    student = jax.tree.map(lambda x: x[:1] if x.ndim and x.shape[0] == 3 else x, t.params)
    student = {**student, "layers": jax.tree.map(lambda x: x[:1] * 0.5, t.params["layers"])}
    batch = _batch(t.tokenizer)
    kd = KDLossConfig(alpha=0.3, temperature=2.0)
    online, aux = kd_loss(student_config, t.config, kd)(student, batch, None, t.params)
    packing = {k: batch[k] for k in ("segment_ids", "positions")}
    s_logits = decoder.forward(student, batch["inputs"], student_config, **packing).logits
    t_logits = decoder.forward(t.params, batch["inputs"], t.config, **packing).logits
    want, _ = losses.distillation_loss(s_logits, t_logits, batch["targets"], batch["loss_mask"], alpha=0.3,
                                       temperature=2.0)
    assert float(online) == pytest.approx(float(want), rel=1e-5)
    assert 0.0 <= float(aux["agreement"]) <= 1.0

    # a cache's rows carry the teacher's top k: the same loss as the online teacher cut to that k
    top = losses.top_k(t_logits, 16)
    cached_batch = {**batch, "teacher_ids": top.ids, "teacher_log_probs": top.log_probs}
    cached, _ = kd_loss(student_config, t.config, kd, cached=True)(student, cached_batch, None, None)
    online_k, _ = kd_loss(student_config, t.config, dataclasses.replace(kd, top_k=16))(student, batch, None, t.params)
    assert float(cached) == pytest.approx(float(online_k), rel=1e-5)


def test_bad_settings_are_refused_before_any_work(teacher, tmp_path):
    with pytest.raises(InputError, match="teacher cache holds output distributions only"):
        _config(teacher, tmp_path, "teacher_cache=somewhere", "loss.hidden_weight=1.0")
    with pytest.raises(InputError, match="one of every_nth_layer, layers and num_layers"):
        _config(teacher, tmp_path, "student.every_nth_layer=2", "student.layers=[0]")
    with pytest.raises(InputError, match="model_overrides"):
        _config(teacher, tmp_path, "student.model_overrides={num_layers: 1}")
    with pytest.raises(InputError, match="alpha"):
        _config(teacher, tmp_path, "loss.alpha=1.5")
    with pytest.raises(InputError, match="layer_map"):
        distill(_config(teacher, tmp_path / "a", "steps=1", "student.layers=[0,2]", "loss.layer_map=[0,5]",
                        "loss.hidden_weight=1.0"))


def test_a_rerun_with_other_distillation_settings_is_refused(teacher, tmp_path):
    out = tmp_path / "run"
    distill(_config(teacher, out, "steps=2", "save_every=2", "student.layers=[0,2]", "export=false"))
    with pytest.raises(InputError, match="loss"):
        distill(_config(teacher, out, "steps=4", "save_every=2", "student.layers=[0,2]", "loss.alpha=0.5"))
    assert json.loads(open(os.path.join(out, "metrics.jsonl")).readline())["step"] == 1


def test_a_student_distils_from_a_teacher_cache_without_loading_the_teacher(teacher, tmp_path):
    from pydoc_data.topics import topics

    from compress.distill import teacher_cache

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(topics[name] for name in sorted(topics)[:6]))
    t = load_decoder(teacher)
    data = DataConfig(sources=(str(text),), seq_len=32, batch_size=1, epochs=1, shuffle=False)
    teacher_cache.write_cache(t.config, t.params, t.tokenizer, data, str(tmp_path / "cache"), k=16,
                              teacher_name=teacher)
    overrides = ["steps=4", "optimizer.total_steps=4", "student.init=random", f"teacher_cache={tmp_path / 'cache'}",
                 "student.model_overrides={num_layers: 1, mlp_dim: 64}"]
    result = distill(_config(teacher, tmp_path / "run", *overrides))
    assert result.stopped == "done"
    metrics = read_metrics(str(tmp_path / "run"))
    assert {"kd", "agreement"} <= set(metrics[4]) and np.isfinite(metrics[4]["kd"])
    with pytest.raises(InputError, match="seq_len"):  # rows of another length than the cache's
        distill(_config(teacher, tmp_path / "other", *overrides, "data.seq_len=64"))


def test_an_int8_teacher_runs_online_from_its_integer_weights(teacher, tmp_path):
    from compress.commands.quantize import quantize_model

    int8 = str(tmp_path / "int8")
    quantize_model(teacher, "int8", int8)
    overrides = ["steps=2", "optimizer.total_steps=3", "student.init=random", "student.model_overrides={num_layers: 1}"]
    result = distill(_config(int8, tmp_path / "run", *overrides))
    assert result.stopped == "done" and np.isfinite(read_metrics(str(tmp_path / "run"))[2]["kd"])
    with pytest.raises(InputError, match="integer weights"):  # a student is cut from float weights
        distill(_config(int8, tmp_path / "cut", "steps=1", "student.layers=[0]"))
