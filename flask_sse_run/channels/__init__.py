"""Channels: publish from anywhere to every subscriber, with replay, across workers and replicas.

A channel is an event log in the app's run store, made by its first publish or subscriber:
:mod:`.names` (names and ids), :mod:`.publishing` (``sse.publish``), :mod:`.hub` (one worker's
fan-out), :mod:`.stream` (one client's stream), :mod:`.views` (the URLs), :mod:`.cli`
(``flask sse publish``).
"""
