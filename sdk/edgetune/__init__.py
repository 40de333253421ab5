"""edgetune: fine-tune language-model adapters on the edge devices that hold the data.

Importing this package is cheap: it never imports torch. The PyTorch trainer, the model loader
and the embedded broker are imported when used, so a device without PyTorch (or a monitoring
tool) can still speak the protocol.
"""

__version__ = "0.3.0"

__all__ = ["__version__"]
