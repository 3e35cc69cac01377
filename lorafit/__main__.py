"""`python -m lorafit [recipe=NAME] [key=value ...]`: compose the config with Hydra, then hand it to run()."""

import hydra

from lorafit.cli import user_errors_as_one_line
from lorafit.config import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@user_errors_as_one_line
def main(cfg) -> float | None:
    from lorafit.run import run  # heavy imports (torch, transformers) only once a job really runs

    return run(cfg)


if __name__ == "__main__":
    main()
