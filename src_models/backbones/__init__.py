"""One file per architecture; importing this package registers them all."""
from . import unet  # noqa: F401
