"""A distillation run on the shared trainer: a teacher's outputs as the student's targets.

    result = distill(load(DistillConfig, "configs/distill-tiny.yaml"))

What it adds to a training run (compress/train/loop.py does the rest: mesh, state, steps,
checkpoints, resumption, metrics, held-out perplexity, export):

  student   pruned from the teacher (its layers `student.layers` or every n-th, its MLP width and
            attention heads by importance on calibration text: compress/distill/students.py,
            pruning.py), or random weights in the teacher's shape with `student.model_overrides`
  teacher   online: the frozen teacher's forward runs inside the same jitted step, on the same
            mesh, its parameters an argument of the step (float, or the integer weights of a
            `press quantize` directory). Cached: `teacher_cache` names a `press teacher-cache`
            directory, whose rows and top-k log-probabilities are the batches; the teacher is
            never loaded (its name is still checked against the cache's)
  loss      α CE + (1 - α) divergence(teacher, student) at temperature T (losses.py), plus
            optionally the hidden states of matched layers (through a learned projection when
            the widths differ) and their attention maps. `alpha: 1` with no hidden or attention
            term is CE-only training of the same student: the baseline distillation must beat

The matched layers: student layer j (0-based) matches teacher layer `loss.layer_map[j]`; by
default the teacher layer it was copied from (a layer-pruned student) or evenly spaced ones.
The trained tree is the student's parameters plus, when hidden states are matched across
widths, `kd_projection` [n, D_student, D_teacher]; the export at the end is the student alone,
an ordinary press model (generate, serve, quantize, eval --compare against the teacher).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from compress import pretrained
from compress.distill import losses, pruning, students
from compress.errors import InputError
from compress.models import decoder
from compress.pretrained import ModelConfig
from compress.train.loop import Recipe, RunConfig, TrainResult, run
from compress.train.loss import PACKING_KEYS, causal_lm_loss

PROJECTION = "kd_projection"


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """The student: cut from the teacher (layers, then widths), or random weights in a smaller shape."""

    init: Literal["teacher", "random"] = "teacher"  # start from the teacher's weights (pruned), or random ones
    every_nth_layer: int = 0  # keep teacher layers 0, n, 2n, ... and the last (0: see `layers`)
    layers: tuple[int, ...] = ()  # teacher layers kept, ascending (empty with every_nth_layer 0: all)
    num_layers: int | None = None  # keep this many teacher layers, those whose removal costs least (greedy)
    layer_windows: int = 8  # calibration windows that score each layer removal (num_layers)
    mlp_dim: int | None = None  # MLP channels kept per layer, the most important on calibration text
    num_heads: int | None = None  # query heads kept per layer, in whole grouped-query groups
    calibration_windows: int = 32  # windows of the language reference's train part that score importance
    calibration_seq_len: int = 128
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # DecoderConfig fields (init: random)

    def __post_init__(self):
        if sum(bool(x) for x in (self.every_nth_layer, self.layers, self.num_layers is not None)) > 1:
            raise InputError("student: give one of every_nth_layer, layers and num_layers")
        if self.init == "random" and (self.every_nth_layer or self.layers or self.num_layers is not None
                                      or self.mlp_dim or self.num_heads):
            raise InputError("student: layers, every_nth_layer, num_layers, mlp_dim and num_heads prune the teacher "
                             "(init: teacher); a random student takes its shape from model_overrides")
        if self.init == "teacher" and self.model_overrides:
            raise InputError("student.model_overrides change a random student's shape (init: random); a student cut "
                             "from the teacher takes layers, every_nth_layer, num_layers, mlp_dim and num_heads")


@dataclasses.dataclass(frozen=True)
class KDLossConfig:
    """The distillation loss (compress/distill/losses.py)."""

    alpha: float = 0.0  # weight of the hard-label cross-entropy; 1 - alpha on the divergence (1: CE only)
    temperature: float = 2.0
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5  # of the generalized JSD
    top_k: int = 0  # online teacher: keep its top k per position (0: the whole distribution)
    hidden_weight: float = 0.0  # weight of the hidden-state loss (0: off)
    hidden_loss: Literal["cosine", "mse"] = "cosine"
    hidden_layers: tuple[int, ...] = ()  # student layers whose outputs are matched (empty: all)
    attention_weight: float = 0.0  # weight of the attention-map loss (0: off)
    attention_layers: tuple[int, ...] = ()  # student layers whose attention maps are matched (empty: the last)
    layer_map: tuple[int, ...] = ()  # the teacher layer of each student layer (empty: copied-from or evenly spaced)

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise InputError(f"loss.alpha must lie in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise InputError(f"loss.temperature must be positive, got {self.temperature}")
        if not 0 < self.beta < 1:
            raise InputError(f"loss.beta must lie in (0, 1), got {self.beta}")
        for name in ("top_k",):
            if getattr(self, name) < 0:
                raise InputError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("hidden_weight", "attention_weight"):
            if getattr(self, name) < 0:
                raise InputError(f"loss.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def needs_teacher(self) -> bool:
        return self.alpha < 1 or self.hidden_weight > 0 or self.attention_weight > 0


@dataclasses.dataclass(frozen=True)
class DistillConfig(RunConfig):
    """`press distill`: a student trained on a teacher's outputs (plus every training run setting)."""

    RESUME_KEYS: ClassVar[tuple[str, ...]] = ("teacher", "student", "loss", "teacher_cache", "data", "freeze")

    teacher: ModelConfig = ModelConfig()
    student: StudentConfig = StudentConfig()
    loss: KDLossConfig = KDLossConfig()
    teacher_cache: str | None = None  # a `press teacher-cache` directory: its rows and top-k are the batches
    out: str = "out/distill"

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_cache and (self.loss.hidden_weight or self.loss.attention_weight):
            raise InputError("a teacher cache holds output distributions only; hidden-state and attention losses need "
                             "the online teacher (remove teacher_cache, or set loss.hidden_weight and "
                             "loss.attention_weight to 0)")
        if self.teacher_cache and self.loss.top_k:
            raise InputError("loss.top_k picks the online teacher's top k; a cache holds its own k")


def distill(config: DistillConfig, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) the distillation `config` describes; see the module docstring."""
    return run(config, functools.partial(_recipe, config, log or (lambda line: None)), log=log)


# ----------------------------------------------------------------------------- the student


def make_student(config: StudentConfig, teacher_config: decoder.DecoderConfig, teacher_params: Any, tokenizer,
                 log: Callable[[str], None]) -> tuple[decoder.DecoderConfig, Any, tuple[int, ...]]:
    """(student config, its parameters or an init function, the teacher layer of each student layer)."""
    if config.init == "random":
        fields = {f.name for f in dataclasses.fields(decoder.DecoderConfig)}
        unknown = sorted(set(config.model_overrides) - fields)
        if unknown:
            raise InputError(f"student.model_overrides: {unknown} are not DecoderConfig fields; known: {sorted(fields)}")
        try:
            student = dataclasses.replace(teacher_config, **config.model_overrides)
        except (TypeError, ValueError) as e:
            raise InputError(f"student.model_overrides {config.model_overrides}: {e}") from None
        if student.vocab_size != teacher_config.vocab_size:
            raise InputError("student.model_overrides: a student shares its teacher's vocabulary "
                             f"(vocab_size {teacher_config.vocab_size})")
        return student, (lambda key: decoder.init_params(student, key)), _evenly_spaced(student, teacher_config)
    if teacher_params is None:
        raise InputError("a student cut from the teacher needs the teacher's weights")
    if any("kernel" not in teacher_params["layers"][name] for name in ("q", "down")):
        raise InputError("the teacher holds integer weights; a student is cut from float weights (distil from the "
                         "float teacher, or from a quantized one with student.init: random)")
    student, params = teacher_config, teacher_params
    layers = tuple(range(teacher_config.num_layers))
    if config.every_nth_layer:
        layers = students.every_nth_layer(teacher_config.num_layers, config.every_nth_layer)
    elif config.layers:
        layers = tuple(config.layers)
    elif config.num_layers is not None:  # chosen on the teacher as it is, before any width is pruned
        windows = pruning.calibration_windows(tokenizer, config.layer_windows, config.calibration_seq_len)
        layers, _ = students.select_layers(teacher_config, teacher_params, windows, config.num_layers, log=log)
    if config.mlp_dim is not None or config.num_heads is not None:
        windows = pruning.calibration_windows(tokenizer, config.calibration_windows, config.calibration_seq_len)
        scores = pruning.importance(student, params, windows)
        student, params = pruning.prune_width(student, params, scores, mlp_dim=config.mlp_dim, num_heads=config.num_heads)
        log(f"student: widths pruned by importance on {len(windows)} calibration windows "
            f"(mlp_dim {teacher_config.mlp_dim} -> {student.mlp_dim}, heads {teacher_config.num_heads} -> {student.num_heads})")
    if len(layers) != teacher_config.num_layers:
        student, params = students.keep_layers(student, params, layers)
        log(f"student: teacher layers {list(layers)} kept")
    # A copy: the step donates the student's buffers, and unpruned leaves are still the teacher's.
    return student, jax.tree.map(lambda x: x.copy(), params), layers


def _evenly_spaced(student: decoder.DecoderConfig, teacher: decoder.DecoderConfig) -> tuple[int, ...]:
    """Teacher layer matched to each student layer: the one at the same relative depth (the last to the last)."""
    ls, lt = student.num_layers, teacher.num_layers
    return tuple(max(0, round((j + 1) * lt / ls) - 1) for j in range(ls))


def parameter_count(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- the recipe


def _recipe(config: DistillConfig, log: Callable[[str], None], mesh) -> Recipe:
    t = config.teacher
    cached = None
    if config.teacher_cache:
        from compress.distill import teacher_cache

        cached = teacher_cache.open_cache(config.teacher_cache)
    need_weights = (config.teacher_cache is None and config.loss.needs_teacher) or config.student.init == "teacher"
    if need_weights:
        teacher = pretrained.load_decoder(t.name, mesh=mesh, param_dtype=t.param_dtype or t.dtype, dtype=t.dtype)
        teacher_config, teacher_params, tokenizer = teacher.config, teacher.params, teacher.tokenizer
    else:
        teacher_config, tokenizer = pretrained.decoder_architecture(t.name)
        teacher_config = dataclasses.replace(teacher_config, dtype=t.dtype, param_dtype=t.param_dtype or t.dtype)
        teacher_params = None
    if cached is not None:
        # The teacher's weights when loaded (for the student), else its name: the cache's dtype is its own.
        teacher_cache.check_for_training(cached, teacher_name=t.name, teacher_params=teacher_params,
                                         tokenizer=tokenizer, seq_len=config.data.seq_len)

    student_config, student_params, copied_from = make_student(config.student, teacher_config, teacher_params, tokenizer,
                                                               log)
    student_config = dataclasses.replace(student_config, param_dtype="float32", dtype=config.teacher.dtype)
    layer_map = tuple(config.loss.layer_map) or copied_from
    kd = config.loss
    if len(layer_map) != student_config.num_layers or any(not 0 <= i < teacher_config.num_layers for i in layer_map):
        raise InputError(f"loss.layer_map {list(layer_map)}: one teacher layer in [0, {teacher_config.num_layers}) "
                         f"for each of the student's {student_config.num_layers} layers")
    hidden_layers = _chosen(kd.hidden_layers, tuple(range(student_config.num_layers)), student_config, "hidden_layers")
    attention_layers = _chosen(kd.attention_layers, (student_config.num_layers - 1,), student_config, "attention_layers")

    params, axes = student_params, decoder.param_axes(student_config)
    project = kd.hidden_weight > 0 and student_config.embed_dim != teacher_config.embed_dim
    if project:
        shape = (len(hidden_layers), student_config.embed_dim, teacher_config.embed_dim)
        init_projection = lambda key: jax.random.normal(key, shape) / math.sqrt(shape[1])  # noqa: E731
        axes = {**axes, PROJECTION: (None, "embed", None)}
        if callable(params):
            params = functools.partial(_with_projection, params, init_projection)
        else:
            params = {**params, PROJECTION: init_projection(jax.random.key(config.seed + 1))}

    total_student = parameter_count(jax.eval_shape(params, jax.random.key(0)) if callable(params) else params)
    total_teacher = parameter_count(decoder.param_shapes(teacher_config))
    log(f"student: {student_config.num_layers} layers, {total_student / 1e6:.1f}M parameters "
        f"({total_student / total_teacher:.2f}x the teacher's {total_teacher / 1e6:.1f}M)")

    loss_fn = kd_loss(student_config, teacher_config, kd, remat=config.remat, cached=cached is not None,
                      hidden_pairs=tuple((j + 1, layer_map[j] + 1) for j in hidden_layers),
                      attention_pairs=tuple((j, layer_map[j]) for j in attention_layers))
    online = cached is None and kd.needs_teacher
    batches = None
    if cached is not None:
        d = config.data
        batches = lambda: teacher_cache.cache_batches(  # noqa: E731
            config.teacher_cache, batch_size=d.batch_size, seed=d.seed, shuffle=d.shuffle, epochs=d.epochs,
            prefetch=d.prefetch)
    student_ce = causal_lm_loss(student_config)
    return Recipe(
        model_config=student_config, params=params, param_axes=axes, tokenizer=tokenizer,
        loss_fn=loss_fn if online else (lambda params, batch, rng: loss_fn(params, batch, rng, None)),
        # the student's own CE; the teacher (a constant of the run) is passed and not read
        eval_loss_fn=lambda params, batch, rng, *teacher: student_ce(params, batch, rng),
        constants=teacher_params if online else None,
        batches=batches,
        exported=lambda tree: {k: v for k, v in tree.items() if k != PROJECTION},
    )


def _with_projection(init_student, init_projection, key):
    student_key, projection_key = jax.random.split(key)
    return {**init_student(student_key), PROJECTION: init_projection(projection_key)}


def _chosen(layers: tuple[int, ...], default: tuple[int, ...], student: decoder.DecoderConfig, name: str):
    layers = tuple(layers) or default
    if list(layers) != sorted(set(layers)) or any(not 0 <= j < student.num_layers for j in layers):
        raise InputError(f"loss.{name} {list(layers)}: distinct ascending student layers in [0, {student.num_layers})")
    return layers


# ----------------------------------------------------------------------------- the loss


def kd_loss(
    student: decoder.DecoderConfig,
    teacher: decoder.DecoderConfig,
    kd: KDLossConfig,
    *,
    remat: str = "none",
    cached: bool = False,
    hidden_pairs: tuple[tuple[int, int], ...] = (),
    attention_pairs: tuple[tuple[int, int], ...] = (),
):
    """`loss_fn(params, batch, rng, teacher_params)` for the train step.

    The teacher is the batch's "teacher_ids"/"teacher_log_probs" (a cache's top-k) when `cached`,
    else `teacher_params` run on the batch's inputs (no gradient flows into them). hidden_pairs
    are (student, teacher) hidden-state numbers (decoder.Capture's: 1 + layer), attention_pairs
    (student, teacher) layers. Aux: "kd", "ce", the weighted "hidden"/"attention" terms when on,
    "agreement" (the student's top-1 equals the teacher's) and "tokens".
    """
    use_hidden = kd.hidden_weight > 0 and bool(hidden_pairs)
    use_attention = kd.attention_weight > 0 and bool(attention_pairs)
    capture_s = decoder.Capture(hidden=tuple(s for s, _ in hidden_pairs) if use_hidden else (),
                                attention=tuple(s for s, _ in attention_pairs) if use_attention else ())
    # The teacher's layers captured once each, in order; `teacher_order` picks them per pair.
    capture_t = decoder.Capture(hidden=tuple(sorted({t for _, t in hidden_pairs})) if use_hidden else (),
                                attention=tuple(sorted({t for _, t in attention_pairs})) if use_attention else ())
    teacher_order = lambda layers, chosen: jnp.asarray([chosen.index(i) for i in layers])  # noqa: E731

    def loss_fn(params, batch, rng, teacher_params):
        del rng
        packing = {key: batch[key] for key in PACKING_KEYS if key in batch}
        mask = batch["loss_mask"]
        out = decoder.forward(params, batch["inputs"], student, remat=remat, capture=capture_s, **packing)
        aux = {}
        if cached:
            teacher_dist = losses.TopK(batch["teacher_ids"], batch["teacher_log_probs"])
            teacher_top1 = batch["teacher_ids"][..., 0]
        elif kd.needs_teacher:
            t_out = decoder.forward(teacher_params, batch["inputs"], teacher, capture=capture_t, **packing)
            t_out = jax.tree.map(jax.lax.stop_gradient, t_out)
            teacher_dist = losses.top_k(t_out.logits, kd.top_k) if kd.top_k else t_out.logits
            teacher_top1 = jnp.argmax(t_out.logits, axis=-1)
        if cached or kd.needs_teacher:
            loss, aux = losses.distillation_loss(out.logits, teacher_dist, batch["targets"], mask, alpha=kd.alpha,
                                                 temperature=kd.temperature, divergence=kd.divergence, beta=kd.beta)
            agree = (jnp.argmax(out.logits, axis=-1) == teacher_top1).astype(jnp.float32)
            aux["agreement"] = jnp.sum(agree * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        else:
            loss = losses.cross_entropy(out.logits, batch["targets"], mask)
            aux["ce"] = loss
        if use_hidden:
            t_hidden = t_out.captured["hidden"][teacher_order([t for _, t in hidden_pairs], capture_t.hidden)]
            h = losses.hidden_state_loss(out.captured["hidden"], t_hidden, mask, params.get(PROJECTION), kd.hidden_loss)
            loss, aux["hidden"] = loss + kd.hidden_weight * h, h
        if use_attention:
            t_att = t_out.captured["attention"][teacher_order([t for _, t in attention_pairs], capture_t.attention)]
            a = losses.attention_loss(out.captured["attention"], t_att, mask)
            loss, aux["attention"] = loss + kd.attention_weight * a, a
        aux["tokens"] = jnp.sum(mask.astype(jnp.float32))
        return loss, aux

    return loss_fn
