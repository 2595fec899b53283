"""Data: records → messages (formats), messages → (ids, labels) (render), batches (dataset)."""
