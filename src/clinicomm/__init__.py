"""clinicomm: email, WhatsApp and SMS for many clinics, each through its own providers."""

__version__ = "0.1.0"
