"""compress: making models smaller or more specialised.

Layers, each importing only from those below it (import-linter checks it, pyproject.toml):

  commands/     `press models`, `press quantize`, `press train`: typed configs, arguments and jobs
  eval/         held-out perplexity, top-1 agreement, bytes; the table and the plot
  train/        the shared trainer: train state and step, optimizer, loss plug, the run (checkpoints,
                exact resume, SIGTERM, NaN stop, metrics, export)
  pretrained    load any decoder (bundled name, HF directory, GGUF, quantized directory) onto a mesh
  checkpoint    orbax checkpoints, restored onto any mesh
  formats/      safetensors, GGUF, Hugging Face configs, quantized directories, the model registry,
                tokenizers, placement of tensors straight onto their shards
  quant/        schemes, grid arithmetic, integer matmuls, round to nearest, GPTQ, SmoothQuant, QAT
  distributed   joining a multi-process (multi-host) job
  data/         corpora (the bundled language reference, its train/held-out split), token windows, and
                training batches through Grain (sources, chat loss masks, packing, shards, resumable)
  sharding      the one table mapping logical axes to the (data, fsdp, tensor) mesh
  config        typed configs: dataclasses, YAML files, key=value overrides
  errors        InputError: bad input, as opposed to a bug
  models/       pure functions over parameter pytrees (decoder, encoder); imports nothing else of press

Distillation and fine-tuning come next, on train/.
"""

# Loading
from compress.pretrained import ModelConfig, Pretrained, load_decoder

# Checkpoints
from compress.checkpoint import Checkpointer

# Sharding
from compress.sharding import MESH_AXES, make_mesh, shard_params, tree_shardings

# Configs and errors
from compress.config import ConfigError, load
from compress.errors import InputError

__all__ = [
    "ModelConfig", "Pretrained", "load_decoder",
    "Checkpointer",
    "MESH_AXES", "make_mesh", "shard_params", "tree_shardings",
    "ConfigError", "load", "InputError",
]
