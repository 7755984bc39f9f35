"""Where `embed`'s rows go: the output folder, a small database (`folder`: its parts, records and summary;
`paths`: every file name it holds; `records`: its typed records; `metadata`: its parquet schema; `lock`:
one writer), and `--out
FILE.npy` (`npy_file`), both written through the durable staging of `eva_open_clip.durable`. Names in
any bytes are written by the rule of `names`."""
