"""What the tests share (no test module is imported for its helpers): reference and full-size checkpoints
(`checkpoints`), the one command-line runner (`cli`), and the shards, images and folder readers of the
`embed` tests (`embed`)."""
