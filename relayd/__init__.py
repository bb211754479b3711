"""relayd: a local SMTP relay that delivers through modern-auth upstreams."""

__version__ = "0.1.0"
