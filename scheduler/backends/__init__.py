"""Execution backends: where gangs actually run. ``base`` is the interface; ``ray_backend``
is the only module of the project that imports ``ray``; ``fake`` serves unit tests of the
loop."""
