"""The examples of README.md run as written: the python of "## The layer", the YAML of
"## Configuration"."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def section_block(title, language):
    """The one ```language block of README.md's section `title`."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one {language} block in '## {title}', found {len(blocks)}"
    return blocks[0]


def test_readme_layer_example_runs_in_a_fresh_interpreter():
    # A fresh process without TF_USE_LEGACY_KERAS: the snippet must select Keras 2 by itself.
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run(
        [sys.executable, "-c", section_block("The layer", "python")],
        cwd=README.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(4, 28, 28, 1) (4, 6) (4, 28, 28, 2)" in result.stdout
    assert re.search(r"2/2 .* loss: [0-9.]+ - accuracy: [0-9.]+", result.stdout)


def test_readme_configuration_example_loads_and_states_the_defaults(tmp_path):
    """Every field it sets but `home` and `multiworker` shows the default value."""
    import yaml

    from pipeline.configs import PipelineConfig, load_config

    path = tmp_path / "readme.yaml"
    path.write_text(section_block("Configuration", "yaml"))
    config = load_config(str(path))
    assert config.multiworker_config().num_workers == 2
    shown = set(yaml.safe_load(path.read_text())) - {"home", "multiworker"}
    assert {"st_iterations", "equivariance_weight"} <= shown
    for name in shown:
        assert getattr(config, name) == getattr(PipelineConfig(), name), name
