"""The queue manager (`manager.QueueManager`) and the decision it makes after each attempt
(`outcome.decide`)."""

from relayd.qmgr.manager import NullObserver, Observer, Queued, QueueManager, UpstreamFactory

__all__ = ["NullObserver", "Observer", "QueueManager", "Queued", "UpstreamFactory"]
