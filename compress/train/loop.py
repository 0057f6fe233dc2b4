"""A training run: model, data, state, step, checkpoints and metrics, from one TrainConfig.

    result = train(load(TrainConfig, "configs/train-tiny.yaml"))

What a run does, in order:
  1. joins the multi-process job (`distributed`), builds the (data, fsdp, tensor) mesh;
  2. loads the model (pretrained weights, or random ones in its shape, `model_overrides` changing
     sizes) and lays the train state out with the run's sharding rules, strictly: a dimension
     the mesh cannot divide is an error naming the parameter;
  3. resumes from the latest checkpoint in `out`/checkpoints if there is one (state and the data
     iterator's position: the run continues exactly, the same losses as without the stop);
  4. steps: each batch (this process's rows of the global batch) becomes one global array, the
     jitted step updates the state in place (donated). A NaN or infinite loss stops the run
     with TrainingDiverged before anything is saved, so the last checkpoint is the last good
     state. SIGTERM (a pod's pre-emption) finishes the step, saves, and returns;
  5. every `save_every` steps an asynchronous checkpoint, every `eval_every` the held-out loss,
     every `log_every` the metrics (out/metrics.jsonl, TensorBoard, the terminal);
  6. at the end: a final checkpoint and the parameters as a Hugging Face directory (out/hf) that
     every other press command loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import signal
import threading
import time
from typing import Any, Callable, ClassVar, Literal

import jax
import numpy as np

from compress import config as cfg
from compress import distributed, file_locks
from compress import pretrained
from compress import sharding as shd
from compress.checkpoint import Checkpointer
from compress.data import corpus
from compress.data.pipeline import DataConfig, train_batches
from compress.data.sources import read_sources
from compress.errors import InputError
from compress.formats import hf_decoder
from compress.models import decoder
from compress.pretrained import ModelConfig
from compress.train.loss import LossFn, causal_lm_loss
from compress.train.metrics import MetricsWriter
from compress.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from compress.train.step import init_train_state, make_train_step
from compress.train.state import TrainState

CHECKPOINTS_DIR = "checkpoints"
RUN_LOCK = "run.lock"  # held by the run writing the directory, never deleted
EXPORT_DIR = "hf"
DATA_ITEM = "data"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving the bad state."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """How the devices are laid out: sizes of the (data, fsdp, tensor) axes; one may be -1 (the rest)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every training run shares (press train, press distill): data, optimizer, steps, layout,
    checkpoints and metrics. A job's config adds what it trains."""

    # Keys a resumed run must share with the run that saved: the state's shape and the data stream.
    RESUME_KEYS: ClassVar[tuple[str, ...]] = ("data", "freeze")

    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    steps: int = 1000  # optimizer updates in all (a resumed run continues to this count)
    grad_accum_steps: int = 1  # microbatches per update (data.batch_size must be a multiple)
    freeze: tuple[str, ...] = ()  # regexes over '/'-joined parameter names kept as they are
    remat: Literal["none", "full", "dots"] = "none"  # what the backward pass recomputes per layer
    mesh: MeshConfig = MeshConfig()
    sharding_rules: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of compress.sharding.RULES
    out: str = "out/train"  # checkpoints/, metrics.jsonl, tensorboard/ and the exported hf/
    save_every: int = 100  # steps between checkpoints (0: none, not even at the end)
    keep_checkpoints: int = 3
    log_every: int = 10  # steps between metrics lines
    eval_every: int = 100  # steps between held-out losses (0: never)
    eval_windows: int = 8  # held-out windows of data.seq_len tokens (the language reference's held-out part)
    # Held-out data instead of those windows: files, or built-in corpora (their held-out part: pydoc,
    # pydoc-qa), packed like the training data, loss where the data's mask says (a chat's answers).
    eval_sources: tuple[str, ...] = ()
    eval_batches: int = 0  # with eval_sources: the first this many batches of them (0: every held-out document)
    eval_at_start: bool = False  # also evaluate before the first step (the starting model's loss)
    export: bool = True  # write the trained parameters as a Hugging Face directory at the end
    seed: int = 0  # of a random init (the data's order has data.seed)
    progress: bool = True
    distributed: bool = False  # call jax.distributed.initialize() first (one process per host)
    coordinator_address: str | None = None  # with distributed, where JAX cannot detect the cluster
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        cfg.require_at_least(self, 1, "steps", "grad_accum_steps", "keep_checkpoints", "log_every", "eval_windows")
        cfg.require_at_least(self, 0, "save_every", "eval_every", "eval_batches", "seed")
        if self.data.batch_size % self.grad_accum_steps:
            raise ValueError(f"data.batch_size={self.data.batch_size} is not a multiple of "
                             f"grad_accum_steps={self.grad_accum_steps}")
        known = {name for name, _ in shd.RULES}
        unknown = sorted(set(self.sharding_rules) - known)
        if unknown:
            raise ValueError(f"sharding_rules: unknown logical axes {unknown}; known: {sorted(known)}")
        distributed.check_cluster_fields(self)

    @property
    def rules(self) -> shd.Rules:
        """compress.sharding.RULES with this run's overrides."""
        return tuple((name, _mesh_axes(self.sharding_rules.get(name, axes))) for name, axes in shd.RULES)


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
    """`press train`: causal-LM training (full, or partial with `freeze`) of a press decoder on text."""

    RESUME_KEYS: ClassVar[tuple[str, ...]] = ("model", "init", "model_overrides", "data", "freeze")

    model: ModelConfig = ModelConfig()
    init: Literal["pretrained", "random"] = "pretrained"  # start from the model's weights, or random ones in its shape
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # DecoderConfig fields (init: random)

    def __post_init__(self):
        super().__post_init__()
        if self.model_overrides and self.init != "random":
            raise ValueError("model_overrides change the model's shape, so they need init: random "
                             f"(got init: {self.init} with {sorted(self.model_overrides)})")


@dataclasses.dataclass
class Recipe:
    """What a run trains and how, built once the mesh exists (press train's causal LM, press distill's
    student and teacher); the run itself (state, steps, checkpoints, metrics, export) is shared."""

    model_config: decoder.DecoderConfig  # of the model exported at the end
    params: Any  # the trained tree, or a function rng -> tree (then created directly on its shards)
    param_axes: Any  # logical axes of the tree's leaves
    tokenizer: Any
    loss_fn: LossFn  # (params, batch, rng[, constants]) -> (loss, aux)
    eval_loss_fn: LossFn  # (params, batch, rng[, constants]) -> (loss, aux): the held-out loss (the model's own CE)
    constants: Any = None  # arrays the loss reads and never trains, laid out on the mesh (a teacher, a frozen base)
    batches: Callable[[], Any] | None = None  # () -> this process's batches (checkpointable); None: the text pipeline
    # The model's parameters within the trained tree, exported as out/hf; None: no model to export.
    exported: Callable[[Any], Any] = lambda params: params
    also_write: Callable[[Any, str], str] | None = None  # (trained tree, out) -> a note: more outputs (an adapter)


@dataclasses.dataclass
class TrainResult:
    steps: int  # updates applied when the run returned
    stopped: str  # "done", or "sigterm" (saved; rerun to continue)
    last_loss: float | None  # None when no step ran (the run had already reached `steps`)
    out: str
    exported: str | None  # the Hugging Face directory, when written
    eval_loss: float | None = None


def train(config: TrainConfig, *, loss_fn: LossFn | None = None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) the training `config` describes; see the module docstring."""
    return run(config, functools.partial(_causal_lm, config, loss_fn), log=log)


def run(config: RunConfig, recipe: Callable[[Any], Recipe], *, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) a training job: `recipe(mesh)` says what it trains; `config` how long and
    where. One run at a time in an `out` directory: another is refused at once (InputError)."""
    distributed.initialize(config)
    with _sole_run(config.out):
        return _run(config, recipe, log)


def _sole_run(out: str):
    """Process 0's hold on out/run.lock (compress/file_locks.py) for the whole run: a second run into
    the same directory would save its checkpoints, metrics and export among the first's (two
    `press train` at once both finished, every step logged twice in one metrics.jsonl). A
    multi-host job's other processes write beside their process 0, under its hold."""
    if jax.process_index() != 0:
        return contextlib.nullcontext()
    os.makedirs(out, exist_ok=True)
    return file_locks.exclusive(os.path.join(out, RUN_LOCK), refuse=InputError(
        f"{out} is in use by another training run (press train, distill or finetune); wait for it to end (then "
        "rerunning this command resumes from its checkpoint), or train into another out directory"))


def _run(config: RunConfig, recipe: Callable[[Any], Recipe], log: Callable[[str], None] | None) -> TrainResult:
    checkpointer = None
    if config.save_every:
        import grain

        checkpointer = Checkpointer(os.path.join(config.out, CHECKPOINTS_DIR), max_to_keep=config.keep_checkpoints,
                                    extra_items={DATA_ITEM: grain.checkpoint.CheckpointHandler()})
        if checkpointer.latest_step() is not None:
            try:
                _check_resumable(checkpointer, config)  # before anything is loaded
            except BaseException:
                checkpointer.close()
                raise
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    job = recipe(mesh)
    tokenizer = job.tokenizer
    optimizer = make_optimizer(config.optimizer)
    state, shardings = init_train_state(
        job.params, optimizer, jax.random.key(config.seed), mesh=mesh, param_axes=job.param_axes,
        freeze=config.freeze, rules=config.rules, strict=True,
    )
    job.params = None
    batch_sharding = shd.batch_sharding(mesh, 2, rules=config.rules)
    constants = () if job.constants is None else (job.constants,)
    step_fn = make_train_step(job.loss_fn, optimizer, mesh, shardings, batch_sharding,
                              grad_accum_steps=config.grad_accum_steps,
                              learning_rate=learning_rate_schedule(config.optimizer),
                              constants_sharding=jax.tree.map(lambda x: x.sharding, job.constants) if constants else None)
    batches = iter(job.batches() if job.batches is not None else train_batches(config.data, tokenizer))
    start = 0
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, start = _resume(checkpointer, state, shardings, batches)
    writer = MetricsWriter(config.out, config.steps, first_step=start, progress=config.progress, log=log)
    if start:
        writer.note(f"resumed from step {start} in {checkpointer.directory}")
    if job.batches is None and config.data.errors:
        with open(config.data.errors, encoding="utf-8") as f:
            skipped = sum(1 for _ in f)
        if skipped:
            writer.note(f"skipped {skipped} bad line{'s' * (skipped != 1)} of the data, each recorded with its "
                        f"file:line and the problem in {config.data.errors}")
    evaluate = (held_out_eval(config, job.eval_loss_fn, tokenizer, shardings, batch_sharding, job.constants)
                if config.eval_every else None)

    if evaluate is not None and config.eval_at_start and start == 0:
        first = evaluate(state.params)
        writer.write(0, {"loss": first, "perplexity": math.exp(min(first, 50.0))}, prefix="eval")

    stop = _SigtermFlag()
    stopped, loss, eval_loss = "done", float("nan"), None
    tokens_seen, window_start = 0, time.perf_counter()
    try:
        with stop:
            for step in range(start, config.steps):
                batch = _global_batch(next(batches), batch_sharding)
                state, metrics = step_fn(state, batch, *constants)
                metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
                loss = metrics["loss"]
                if not math.isfinite(loss):
                    kept = checkpointer.latest_step() if checkpointer is not None else None
                    raise TrainingDiverged(
                        f"the loss is {loss} at step {step + 1}; stopped without saving. "
                        + (f"The last good checkpoint, step {kept}, is kept in {checkpointer.directory}; "
                           if kept is not None else "No checkpoint was saved yet; ")
                        + "lower optimizer.learning_rate or clip harder (optimizer.clip_norm) and rerun"
                    )
                done = step + 1
                tokens_seen += metrics.get("tokens", 0.0)
                if done % config.log_every == 0 or done == config.steps:
                    elapsed = time.perf_counter() - window_start
                    metrics["tokens_per_s"] = tokens_seen / elapsed if elapsed > 0 else 0.0
                    writer.write(done, metrics)
                    tokens_seen, window_start = 0, time.perf_counter()
                if evaluate is not None and (done % config.eval_every == 0 or done == config.steps):
                    eval_loss = evaluate(state.params)
                    writer.write(done, {"loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))}, prefix="eval")
                stopping = stop.agreed()
                if checkpointer is not None and (done % config.save_every == 0 or done == config.steps or stopping):
                    _save(checkpointer, done, state, batches, config)
                if stopping:
                    stopped = "sigterm"
                    writer.note(f"SIGTERM: saved step {done}" + (f" in {checkpointer.directory}" if checkpointer else "")
                                + "; run the same command again to continue")
                    break
        if checkpointer is not None:
            checkpointer.wait()
        exported = None
        if config.export and stopped == "done":
            model = job.exported(state.params)
            if model is not None:
                exported = os.path.join(config.out, EXPORT_DIR)
                _export(model, job.model_config, tokenizer, exported)
                writer.note(f"exported the trained model to {exported} (press generate --model {exported})")
            if job.also_write is not None:
                params = _gathered(state.params)
                if jax.process_index() == 0:
                    writer.note(job.also_write(params, config.out))
    finally:
        writer.close()
        if checkpointer is not None:
            checkpointer.close()
        batches.close()  # stops Grain's prefetch thread (left to the interpreter's exit, it complains)
    return TrainResult(int(jax.device_get(state.step)), stopped, loss if math.isfinite(loss) else None, config.out,
                       exported, eval_loss)


# ----------------------------------------------------------------------------- pieces


def _causal_lm(config: TrainConfig, loss_fn: LossFn | None, mesh) -> Recipe:
    """press train's job: the model, trained on the text pipeline with the causal LM loss (or `loss_fn`)."""
    model_config, params, tokenizer = _model(config, mesh)
    eval_loss_fn = causal_lm_loss(model_config, remat=config.remat)
    return Recipe(model_config, params, decoder.param_axes(model_config), tokenizer,
                  loss_fn=loss_fn or eval_loss_fn, eval_loss_fn=loss_fn or eval_loss_fn)


def _model(config: TrainConfig, mesh) -> tuple[decoder.DecoderConfig, Any, Any]:
    """(model config, parameters or an init function, tokenizer)."""
    m = config.model
    param_dtype = m.param_dtype or "float32"  # train in float32 storage unless asked otherwise
    if config.init == "random":
        base, tokenizer = pretrained.decoder_architecture(m.name)
        fields = {f.name for f in dataclasses.fields(decoder.DecoderConfig)}
        unknown = sorted(set(config.model_overrides) - fields)
        if unknown:
            raise InputError(f"model_overrides: {unknown} are not DecoderConfig fields; known: {sorted(fields)}")
        try:
            model_config = dataclasses.replace(base, **config.model_overrides, dtype=m.dtype, param_dtype=param_dtype)
        except (TypeError, ValueError) as e:
            raise InputError(f"model_overrides {config.model_overrides}: {e}") from None
        return model_config, lambda key: decoder.init_params(model_config, key), tokenizer
    loaded = pretrained.load_decoder(m.name, mesh=mesh, param_dtype=param_dtype, dtype=m.dtype)
    if loaded.quantization is not None:
        raise InputError(f"{m.name} holds integer weights ({loaded.quantization}); train the float model it was "
                         "quantized from, then quantize the result (quantization-aware training: press quantize)")
    return loaded.config, loaded.params, loaded.tokenizer


def _check_resumable(checkpointer: Checkpointer, config: RunConfig) -> None:
    """The latest checkpoint was saved by a run with this run's model, data and frozen leaves."""
    saved = checkpointer.restore_metadata(checkpointer.latest_step()).get("config", {})
    now = cfg.to_dict(config)
    changed = [key for key in config.RESUME_KEYS if key in saved and saved[key] != now[key]]
    if changed:
        raise InputError(
            f"{checkpointer.directory} holds a run with other {', '.join(changed)} "
            f"(saved {', '.join(f'{k}={saved[k]!r}' for k in changed)}); resume with the same settings, "
            f"or train into another out directory"
        )


def _resume(checkpointer: Checkpointer, state: TrainState, shardings, batches):
    import grain

    step = checkpointer.latest_step()
    state = checkpointer.restore(step, shapes=state, shardings=shardings)
    checkpointer.restore_item(DATA_ITEM, grain.checkpoint.CheckpointRestore(batches), step)
    return state, step


def _save(checkpointer: Checkpointer, step: int, state: TrainState, batches, config: RunConfig) -> None:
    import grain

    if step in checkpointer.all_steps():
        return  # saved already (the last step of a run resumed from its end)
    checkpointer.save(step, state, metadata={"config": cfg.to_dict(config)},
                      extra={DATA_ITEM: grain.checkpoint.CheckpointSave(batches)})


def _global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """This process's rows of every batch entry as one global array laid out by `sharding`."""
    return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in local.items()}


def held_out_eval(config: RunConfig, loss_fn: LossFn, tokenizer, shardings: TrainState, batch_sharding,
                  constants: Any = None):
    """params -> mean loss over the held-out windows (every process builds the same windows);
    `constants`, when given, are the loss's last argument (as in the train step)."""
    batches = _eval_batches(config, tokenizer) if config.eval_sources else _eval_windows(config, tokenizer)
    batches = [{k: jax.make_array_from_callback(v.shape, batch_sharding, lambda i, v=v: v[i]) for k, v in b.items()}
               for b in batches]
    key = jax.random.key(0)
    extra = () if constants is None else (constants,)
    loss_of = jax.jit(lambda params, batch, *extra: loss_fn(params, batch, key, *extra)[0],
                      in_shardings=(shardings.params, batch_sharding, *(jax.tree.map(lambda x: x.sharding, c)
                                                                        for c in extra)))

    tokens = np.asarray([float(np.sum(b["loss_mask"])) for b in batches])

    def evaluate(params) -> float:  # the mean over every counted token (batches may count different numbers)
        losses = np.asarray([float(loss_of(params, b, *extra)) for b in batches])
        return float(np.sum(losses * tokens) / np.sum(tokens))

    return evaluate


def _eval_windows(config: RunConfig, tokenizer) -> list[dict[str, np.ndarray]]:
    """Batches of consecutive windows of the language reference's held-out text (every token counts)."""
    text, source = corpus.held_out_text()
    seq_len, rows = config.data.seq_len, config.data.batch_size
    windows = corpus.token_windows(tokenizer.encode(text), seq_len + 1, config.eval_windows, source)
    count = len(windows) - len(windows) % rows
    if count == 0:
        raise InputError(f"{source}: {len(windows)} held-out windows of {seq_len + 1} tokens, fewer than one batch "
                         f"of {rows}; raise eval_windows or set eval_every: 0")
    ones = np.ones((rows, seq_len), np.int32)
    return [
        {"inputs": w[:, :-1], "targets": w[:, 1:], "segment_ids": ones,
         "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)),
         "loss_mask": ones.astype(np.float32)}
        for w in np.split(windows[:count], count // rows)
    ]


def _eval_batches(config: RunConfig, tokenizer) -> list[dict[str, np.ndarray]]:
    """Every held-out document of `eval_sources` once, packed in order (or the first
    `eval_batches` batches of them); the last batch is filled with rows that count nothing."""
    documents = read_sources(config.eval_sources, held_out=True)
    data = DataConfig(sources=config.eval_sources, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                      shuffle=False, epochs=1, prefetch=0)
    stream = train_batches(data, tokenizer, shard_index=0, shard_count=1, documents=documents)
    batches = list(itertools.islice(stream, config.eval_batches or None))
    if not batches:
        raise InputError(f"eval_sources {list(config.eval_sources)}: no held-out tokens to evaluate on")
    rows = config.data.batch_size
    last = batches[-1]
    if len(last["inputs"]) < rows:
        pad = rows - len(last["inputs"])
        batches[-1] = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in last.items()}
    return batches


def _gathered(params: Any) -> Any:
    """The whole arrays on every process (a no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    return params


def _export(params: Any, model_config: decoder.DecoderConfig, tokenizer, directory: str) -> None:
    """The parameters as a Hugging Face directory, written by process 0 (gathered from every host)."""
    params = _gathered(params)
    if jax.process_index() == 0:
        hf_decoder.export(params, model_config, directory, tokenizer=tokenizer, dtype="float32")


def _mesh_axes(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class _SigtermFlag:
    """Within `with`: SIGTERM sets `.set` (the loop saves and stops after its step) instead of killing."""

    def __init__(self) -> None:
        self.set = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.set = True

    def agreed(self) -> bool:
        """Whether any process got SIGTERM: every process must stop after the same step, or the
        others would wait forever in the next step's collectives (one exchange per step)."""
        if jax.process_count() == 1:
            return self.set
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.set))))

    def __enter__(self) -> _SigtermFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
