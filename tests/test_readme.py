"""The README's Python example runs as written (pointed at a trained autoencoder) and answers in seconds."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The first ```python block of the README."""
    return re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)


def test_the_readme_example_runs(chain):
    code = readme_example()
    assert 'load_autoencoder("outputs/demo/work/autoencoder/model")' in code
    code = code.replace("outputs/demo/work/autoencoder/model", str(chain["autoencoder"] / "model"))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert namespace["latents"].shape == (1, 4, 8, 8, 8)
    assert namespace["frames"].shape == (1, 3, 8, 32, 32) and torch.isfinite(namespace["frames"]).all()
