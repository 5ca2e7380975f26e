"""The one step of the self-hosted Kubeflow package: `stn-pipeline watch --once` on its config.

    python -m pipeline.kfp_step CONFIG_YAML

CONFIG_YAML is the text of a config file (the package's `config_yaml` parameter, which the
Kubeflow UI lets a run change, all but the home, where the package mounts the claims; the home
defaults to /stn/home, as `compile`'s does). The step
polls the config's data root once: a new span is trained on, evaluated and pushed if blessed;
no new span, no run. The exit status is `watch`'s (0 done or nothing to do, 1 the run failed,
2 a bad config or state file, 3 another run or watcher holds the home).
"""

import os
import sys
import tempfile

from pipeline import cli
from pipeline.configs import load_config
from pipeline.kubeflow_runner import DEFAULT_KUBEFLOW_HOME
from pipeline.kubeflow_watch import HOME_ENV, check_step_config, config_text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pipeline.kfp_step CONFIG_YAML", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="stn-kfp-step-") as folder:
        path = os.path.join(folder, "pipeline.yaml")
        with open(path, "w") as handle:
            handle.write(argv[0])
        try:
            config = load_config(path, defaults={"home": DEFAULT_KUBEFLOW_HOME})
            check_step_config(config, os.environ.get(HOME_ENV))
        except ValueError as error:
            message = str(error).replace(f"config file {path}", "config_yaml")
            print(f"stn-pipeline kfp step: {message}", file=sys.stderr)
            return 2
        with open(path, "w") as handle:  # as resolved: `watch` reads no defaults of ours
            handle.write(config_text(config))
        return cli.main(["watch", "--once", "--config", path, "--data-root", config.data_dir])


if __name__ == "__main__":
    sys.exit(main())
