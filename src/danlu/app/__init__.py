"""Front ends over the library: the ``danlu`` CLI, terminal chat, the demo."""
