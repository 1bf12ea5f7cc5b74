"""One file per architecture; importing this package registers them all."""
from . import unet  # noqa: F401
from . import vnet  # noqa: F401
from . import r2unet  # noqa: F401
from . import resunetpp  # noqa: F401
from . import multiresunet  # noqa: F401
from . import doubleunet  # noqa: F401
