"""Logger factories that need a decision at run time."""

from __future__ import annotations

import os

from lightning.pytorch.loggers import WandbLogger


def wandb_credentials_present() -> bool:
    """True when W&B has an API key (environment or ``wandb login``), checked without prompting."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # no key, no netrc, no server: nothing to log in with
        return False


def wandb_logger(offline: bool | None = None, **kwargs) -> WandbLogger:
    """A ``WandbLogger`` that runs offline unless the user is logged in (or ``WANDB_MODE`` says otherwise)."""
    if offline is None:
        mode = os.environ.get("WANDB_MODE")
        offline = mode in ("offline", "dryrun", "disabled") if mode else not wandb_credentials_present()
    if kwargs.get("save_dir"):
        os.makedirs(kwargs["save_dir"], exist_ok=True)
    if offline:  # Lightning's offline flag sets WANDB_MODE=dryrun, which this W&B no longer reads as offline
        kwargs.setdefault("mode", "offline")
    return WandbLogger(offline=offline, **kwargs)
