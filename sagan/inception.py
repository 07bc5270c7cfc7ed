"""The Inception v3 weights of FID and IS (torch-fidelity's TF port, the standard for ImageNet): a local file, or
downloaded once into $TORCH_HOME/hub/checkpoints; the file's sha256 is checked before torch-fidelity reads it,
since it unpickles that file without `weights_only`."""

import socket
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from .errors import MetricsError
from .files import sha256_file

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the file name carries its sha256 prefix
INCEPTION_URL = URL_INCEPTION_V3


def inception_weights(path: str | None = None, download: bool = True, timeout: float = 30.0) -> Path:
    """The official Inception weights file: `path`, else $TORCH_HOME/hub/checkpoints/<file>, else downloaded
    there. Raises MetricsError (saying how to provide the file) when there is none and no network."""
    if path:
        found = Path(path).expanduser()
        if not found.is_file():
            raise MetricsError(f"Inception weights {found} do not exist; pass the path of {INCEPTION_FILE}")
        _check_sha256(found)
        return found
    home = Path(torch.hub.get_dir()) / "checkpoints"
    found = home / INCEPTION_FILE
    if found.is_file():
        _check_sha256(found)
        return found
    if download:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)  # an offline cluster with a black-holed route must not hang here
        try:
            home.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(
                INCEPTION_URL, str(found), hash_prefix=INCEPTION_SHA256_PREFIX, progress=True
            )
            return found
        except Exception as e:  # noqa: BLE001 - any download failure has the same fix
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        finally:
            socket.setdefaulttimeout(old)
    else:
        reason = "downloads disabled"
    raise MetricsError(
        f"no Inception weights: none given, none at {found}, and the download from {INCEPTION_URL} "
        f"failed ({reason}); fetch {INCEPTION_FILE} where there is internet and pass "
        f"--inception-weights PATH (or eval.inception_weights=PATH), or copy it to {home}/"
    )


def _check_sha256(path: Path) -> None:
    digest = sha256_file(path)
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        raise MetricsError(
            f"{path} is not {INCEPTION_FILE} (sha256 {digest[:8]}..., expected {INCEPTION_SHA256_PREFIX}...); "
            "FID/IS are only comparable with the standard weights"
        )
