"""The queue manager (`manager.QueueManager`) and the decision it makes after each attempt
(`outcome.decide`)."""

from relayd.qmgr.manager import QueueManager, UpstreamFactory
from relayd.qmgr.observer import NullObserver, Observer
from relayd.qmgr.queued import Queued

__all__ = ["NullObserver", "Observer", "QueueManager", "Queued", "UpstreamFactory"]
