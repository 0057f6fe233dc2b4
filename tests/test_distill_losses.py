"""KD losses (compress/distill/losses.py): each against torch's reference or its definition, zero when
the student is the teacher, the T² scaling, top-k sparse teachers, masks and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from compress.distill import losses

B, T, V = 2, 5, 11


def _logits(seed: int, scale: float = 3.0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, V)) * scale, jnp.float32)


STUDENT, TEACHER = _logits(0), _logits(1)
MASK = jnp.asarray(np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), jnp.float32)


def _torch_forward_kl(student, teacher, mask, t):
    """The classic KD loss as written with torch: kl_div(log q, log p) summed over the vocabulary, T²."""
    log_q = torch.log_softmax(torch.tensor(np.asarray(student)) / t, -1)
    log_p = torch.log_softmax(torch.tensor(np.asarray(teacher)) / t, -1)
    per_position = torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    m = torch.tensor(np.asarray(mask))
    return float((per_position * m).sum() / m.sum() * t**2)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_forward_kl_equals_torch_kl_div(temperature):
    got = float(losses.forward_kl(STUDENT, TEACHER, MASK, temperature))
    assert got == pytest.approx(_torch_forward_kl(STUDENT, TEACHER, MASK, temperature), rel=1e-5)


def test_reverse_kl_is_the_forward_kl_with_the_roles_swapped():
    assert float(losses.reverse_kl(STUDENT, TEACHER, MASK, 2.0)) == pytest.approx(
        _torch_forward_kl(TEACHER, STUDENT, MASK, 2.0), rel=1e-5)


@pytest.mark.parametrize("loss", [losses.forward_kl, losses.reverse_kl, losses.generalized_jsd])
def test_every_divergence_is_zero_for_the_teacher_itself_and_positive_otherwise(loss):
    assert float(loss(TEACHER, TEACHER, MASK, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(STUDENT, TEACHER, MASK, 2.0)) > 0.01


def test_jsd_with_beta_one_half_is_symmetric_and_bounded_by_t2_log_2():
    a = float(losses.generalized_jsd(STUDENT, TEACHER, MASK, 1.0, beta=0.5))
    b = float(losses.generalized_jsd(TEACHER, STUDENT, MASK, 1.0, beta=0.5))
    assert a == pytest.approx(b, rel=1e-5) and 0 < a <= np.log(2)
    # the textbook Jensen-Shannon divergence, in numpy
    p, q = (np.exp(np.asarray(jax.nn.log_softmax(x), np.float64)) for x in (TEACHER, STUDENT))
    m = (p + q) / 2
    jsd = (0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1))
    assert a == pytest.approx(float((jsd * np.asarray(MASK)).sum() / np.asarray(MASK).sum()), rel=1e-4)


def test_masked_positions_do_not_count():
    changed = STUDENT.at[0, 3:].set(100.0)  # only masked positions differ
    for loss in (losses.forward_kl, losses.reverse_kl, losses.generalized_jsd):
        assert float(loss(changed, TEACHER, MASK)) == pytest.approx(float(loss(STUDENT, TEACHER, MASK)), rel=1e-6)
    assert float(losses.forward_kl(STUDENT, TEACHER, jnp.zeros((B, T)))) == 0.0


def test_top_k_with_k_equal_to_the_vocabulary_is_the_full_loss_and_a_small_k_is_close():
    for loss in (losses.forward_kl, losses.reverse_kl, losses.generalized_jsd):
        full = float(loss(STUDENT, TEACHER, MASK, 2.0))
        assert float(loss(STUDENT, losses.top_k(TEACHER, V), MASK, 2.0)) == pytest.approx(full, rel=1e-5)
    peaked = _logits(1, scale=12.0)  # a confident teacher: its top 4 hold nearly all the mass
    full = float(losses.forward_kl(STUDENT, peaked, MASK))
    assert float(losses.forward_kl(STUDENT, losses.top_k(peaked, 4), MASK)) == pytest.approx(full, rel=0.05)


def test_the_forward_kl_gradient_is_the_difference_of_the_softened_distributions():
    t = 2.0
    grad = jax.grad(lambda s: losses.forward_kl(s, TEACHER, MASK, t))(STUDENT)
    # d/dz [T² KL(p || softmax(z/T))] = T (softmax(z/T) - p) per position, over the masked mean's count
    want = t * (jax.nn.softmax(STUDENT / t) - jax.nn.softmax(TEACHER / t)) * MASK[..., None] / MASK.sum()
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-4, atol=1e-7)


def test_temperature_squared_keeps_the_gradient_scale():
    norms = [float(jnp.linalg.norm(jax.grad(lambda s: losses.forward_kl(s, TEACHER, MASK, t))(STUDENT)))
             for t in (2.0, 8.0)]
    assert 0.2 < norms[1] / norms[0] < 5  # without the T² factor the ratio would be about 1/16


def test_alpha_mixes_hard_label_cross_entropy_with_the_divergence():
    targets = jnp.asarray(np.random.default_rng(2).integers(0, V, size=(B, T)), jnp.int32)
    log_q = torch.log_softmax(torch.tensor(np.asarray(STUDENT)), -1)
    keep = torch.tensor(np.asarray(MASK).astype(bool))
    ce_torch = torch.nn.functional.nll_loss(log_q[keep], torch.tensor(np.asarray(targets)).long()[keep])
    loss, aux = losses.distillation_loss(STUDENT, TEACHER, targets, MASK, alpha=0.25, temperature=2.0)
    assert float(aux["ce"]) == pytest.approx(float(ce_torch), rel=1e-5)
    assert float(loss) == pytest.approx(0.25 * float(aux["ce"]) + 0.75 * float(aux["kd"]), rel=1e-6)
    with pytest.raises(ValueError, match="divergence"):
        losses.distillation_loss(STUDENT, TEACHER, targets, MASK, divergence="kl")
    with pytest.raises(ValueError, match="same tokenizer"):
        losses.forward_kl(STUDENT, TEACHER[..., :5], MASK)


def test_hidden_state_losses_are_zero_for_equal_streams_and_see_through_the_projection():
    rng = np.random.default_rng(5)
    teacher = jnp.asarray(rng.normal(size=(2, B, T, 6)), jnp.float32)
    for kind in ("cosine", "mse"):
        assert float(losses.hidden_state_loss(teacher, teacher, MASK, kind=kind)) == pytest.approx(0.0, abs=1e-6)
    # a narrower student mapped exactly onto the teacher by its projection: zero again
    student = jnp.asarray(rng.normal(size=(2, B, T, 4)), jnp.float32)
    projection = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
    mapped = jnp.einsum("LBTS,LSD->LBTD", student, projection)
    assert float(losses.hidden_state_loss(student, mapped, MASK, projection, kind="mse")) == pytest.approx(0.0, abs=1e-6)
    # cosine ignores scale; mse is the mean squared difference over the counted positions
    assert float(losses.hidden_state_loss(3.0 * teacher, teacher, MASK)) == pytest.approx(0.0, abs=1e-6)
    other = teacher + 1.0
    want = float(jnp.sum(jnp.mean((other - teacher) ** 2, axis=(0, 3)) * MASK) / MASK.sum())
    assert float(losses.hidden_state_loss(other, teacher, MASK, kind="mse")) == pytest.approx(want, rel=1e-6)
    grad = jax.grad(lambda p: losses.hidden_state_loss(student, teacher, MASK, p, kind="mse"))(projection)
    assert float(jnp.abs(grad).sum()) > 0  # the projection learns


def test_the_attention_loss_is_zero_for_equal_maps_and_the_kl_of_each_query_row():
    rng = np.random.default_rng(6)

    def maps(heads):
        scores = jnp.asarray(rng.normal(size=(1, B, heads, T, T)), jnp.float32)
        causal = jnp.tril(jnp.ones((T, T), bool))
        return jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)

    teacher, student = maps(4), maps(4)
    assert float(losses.attention_loss(teacher, teacher, MASK)) == pytest.approx(0.0, abs=1e-7)
    p, q = np.asarray(teacher, np.float64), np.asarray(student, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)  # [1, B, N, T]
    want = (kl.mean(axis=(0, 2)) * np.asarray(MASK)).sum() / np.asarray(MASK).sum()
    assert float(losses.attention_loss(student, teacher, MASK)) == pytest.approx(want, rel=1e-5)
    # different head counts compare the heads' mean maps
    two_heads = maps(2)
    mean_kl = losses.attention_loss(two_heads.mean(axis=2, keepdims=True), teacher.mean(axis=2, keepdims=True), MASK)
    assert float(losses.attention_loss(two_heads, teacher, MASK)) == pytest.approx(float(mean_kl), rel=1e-6)
