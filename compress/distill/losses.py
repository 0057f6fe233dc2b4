"""Knowledge-distillation losses: pure functions of student logits and a teacher's distribution.

Every loss takes the student's logits [B, T, V], the teacher's (full logits [B, T, V], or its
top-k as `TopK`: the ids and the log-probabilities at them, what a teacher cache stores), and a
mask [B, T] of the positions that count, and returns the masked mean over those positions
(0 with an empty mask). Distributions are softened by a temperature T, and each divergence is
multiplied by T², so its gradient keeps the same scale whatever T (Hinton et al., 2015).

  forward KL   KL(teacher || student): mass-covering, the classic KD loss
  reverse KL   KL(student || teacher): mode-seeking (MiniLLM)
  JSD(β)       β KL(teacher || M) + (1 - β) KL(student || M), M = β teacher + (1 - β) student:
               the generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024); β = 0.5 is
               the symmetric JSD, and it tends to the forward KL as β -> 0 (scaled by β) and the
               reverse as β -> 1
  distillation_loss   α x cross-entropy on the hard labels + (1 - α) x one of the above

Beside the output distribution, a student can match the teacher's insides:

  hidden_state_loss   the residual stream of matched layers, through a learned projection when
                      the widths differ (TinyBERT, Jiao et al. 2020): 1 - cosine similarity
                      (DistilBERT's) or the mean squared error
  attention_loss      the attention maps of matched layers: KL(teacher || student) over the keys
                      of each query (MiniLM, Wang et al. 2020), per head, or over the heads'
                      mean when the head counts differ

Top-k: a 49k-152k vocabulary makes a teacher's full distribution per token too large to
keep; with `TopK` the teacher's distribution is its top k probabilities renormalised, and the
student's full-vocabulary log-probabilities are read at those ids (sparse KD). With k = V this
is exactly the full loss.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


class TopK(NamedTuple):
    """A teacher's top k per position: ids [B, T, k] int32 and their log-probabilities [B, T, k]
    under its distribution over the whole vocabulary at temperature 1. A loss at temperature T
    softens them itself (log p / T, renormalised over the k ids: the top k of the softened
    distribution, renormalised), so one stored top-k (a teacher cache) serves every T."""

    ids: jax.Array
    log_probs: jax.Array


def top_k(teacher_logits: jax.Array, k: int) -> TopK:
    """The teacher's k most likely ids per position and their log-probabilities (temperature 1)."""
    log_probs = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    values, ids = jax.lax.top_k(log_probs, k)
    return TopK(ids.astype(jnp.int32), values)


def forward_kl(student_logits, teacher, mask, temperature: float = 1.0) -> jax.Array:
    """T² KL(teacher || student), the masked mean per position."""
    log_p, log_q = _log_probs(student_logits, teacher, temperature)
    return _masked_mean(_kl(log_p, log_q), mask) * temperature**2


def reverse_kl(student_logits, teacher, mask, temperature: float = 1.0) -> jax.Array:
    """T² KL(student || teacher), the masked mean per position."""
    log_p, log_q = _log_probs(student_logits, teacher, temperature, renormalise_student=True)
    return _masked_mean(_kl(log_q, log_p), mask) * temperature**2


def generalized_jsd(student_logits, teacher, mask, temperature: float = 1.0, beta: float = 0.5) -> jax.Array:
    """T² [β KL(teacher || M) + (1 - β) KL(student || M)], M = β teacher + (1 - β) student."""
    if not 0 < beta < 1:
        raise ValueError(f"beta must lie in (0, 1), got {beta} (use forward_kl or reverse_kl for the limits)")
    log_p, log_q = _log_probs(student_logits, teacher, temperature, renormalise_student=True)
    log_m = jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
    divergence = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    return _masked_mean(divergence, mask) * temperature**2


def cross_entropy(student_logits, targets, mask) -> jax.Array:
    """The hard-label loss: -log q(target), the masked mean per position."""
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_q, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return _masked_mean(-picked, mask)


def distillation_loss(student_logits, teacher, targets, mask, *, alpha: float = 0.0, temperature: float = 2.0,
                      divergence: Divergence = "forward_kl", beta: float = 0.5) -> tuple[jax.Array, dict[str, jax.Array]]:
    """α CE(targets) + (1 - α) divergence(teacher, student); (loss, {"kd", "ce"}) for the train step's aux."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if divergence == "forward_kl":
        kd = forward_kl(student_logits, teacher, mask, temperature)
    elif divergence == "reverse_kl":
        kd = reverse_kl(student_logits, teacher, mask, temperature)
    elif divergence == "jsd":
        kd = generalized_jsd(student_logits, teacher, mask, temperature, beta)
    else:
        raise ValueError(f"divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    ce = cross_entropy(student_logits, targets, mask)
    return alpha * ce + (1 - alpha) * kd, {"kd": kd, "ce": ce}


def hidden_state_loss(student, teacher, mask, projection=None, kind: Literal["cosine", "mse"] = "cosine") -> jax.Array:
    """Distance between matched residual streams, the masked mean over layers and positions.

    Args:
      student: [n, B, T, Ds] hidden states of n student layers.
      teacher: [n, B, T, Dt] the teacher's layers matched to them.
      mask: [B, T] positions that count.
      projection: [n, Ds, Dt] learned maps into the teacher's width (one per matched layer), or
        None when Ds == Dt.
      kind: "cosine" (1 - cosine similarity: scale-free, so layers whose streams have very
        different norms weigh the same) or "mse" (mean over the width of the squared difference).
    """
    student = student.astype(jnp.float32)
    teacher = teacher.astype(jnp.float32)
    if projection is not None:
        student = jnp.einsum("LBTS,LSD->LBTD", student, projection.astype(jnp.float32))
    if student.shape != teacher.shape:
        raise ValueError(f"student hidden states {student.shape} and the teacher's {teacher.shape} differ; "
                         "a projection maps the student's width to the teacher's")
    if kind == "cosine":
        dot = jnp.sum(student * teacher, axis=-1)
        norms = jnp.linalg.norm(student, axis=-1) * jnp.linalg.norm(teacher, axis=-1)
        per_position = 1.0 - dot / jnp.maximum(norms, 1e-8)  # [n, B, T]
    elif kind == "mse":
        per_position = jnp.mean(jnp.square(student - teacher), axis=-1)
    else:
        raise ValueError(f"hidden-state loss {kind!r}; choose cosine or mse")
    return _masked_mean(jnp.mean(per_position, axis=0), mask)


def attention_loss(student, teacher, mask) -> jax.Array:
    """KL(teacher || student) of matched attention maps over each query's keys, the masked mean.

    Args:
      student: [n, B, Ns, T, S] attention probabilities of n student layers.
      teacher: [n, B, Nt, T, S] the teacher's matched layers; with Ns != Nt both are averaged
        over their heads first (a map per layer).
      mask: [B, T] query positions that count.
    """
    student = student.astype(jnp.float32)
    teacher = teacher.astype(jnp.float32)
    if student.shape[2] != teacher.shape[2]:
        student, teacher = (x.mean(axis=2, keepdims=True) for x in (student, teacher))
    log = lambda p: jnp.log(jnp.maximum(p, 1e-30))  # noqa: E731  (masked keys have p = 0 exactly)
    kl = jnp.sum(jnp.where(teacher > 0, teacher * (log(teacher) - log(student)), 0.0), axis=-1)  # [n, B, N, T]
    return _masked_mean(kl.mean(axis=(0, 2)), mask)


# ----------------------------------------------------------------------------- pieces


def _log_probs(student_logits, teacher, temperature: float, renormalise_student: bool = False):
    """(teacher log p, student log q) over the same support: the vocabulary, or the teacher's top k
    (p renormalised over them; q the student's full-vocabulary log-probabilities read at them, which
    the forward KL keeps as they are, a cross-entropy against the teacher's top k, and the reverse KL
    and JSD renormalise, so both sides are distributions over the same k ids)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    if isinstance(teacher, TopK):
        softened = teacher.log_probs.astype(jnp.float32) / temperature
        log_p = softened - jax.nn.logsumexp(softened, axis=-1, keepdims=True)
        log_q = jnp.take_along_axis(log_q, teacher.ids, axis=-1)
        if renormalise_student:
            log_q = log_q - jax.nn.logsumexp(log_q, axis=-1, keepdims=True)
        return log_p, log_q
    if teacher.shape != student_logits.shape:
        raise ValueError(f"teacher logits {teacher.shape} and student logits {student_logits.shape} differ; "
                         "a student distils from a teacher with the same tokenizer")
    return jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1), log_q


def _kl(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """KL(a || b) per position over the last axis; 0 · log 0 is 0."""
    a = jnp.exp(log_a)
    return jnp.sum(jnp.where(a > 0, a * (log_a - log_b), 0.0), axis=-1)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
