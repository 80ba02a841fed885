"""What more than one stage uses, so that stages never import each other: the tokenization contract
(``formatting``), context lengths (``context``), generation settings and in-process decoding (``generation``),
the capability ladder and stopping rules (``capability``), capability metrics (``metrics``), jsonl data and
weighted batches (``data``), checkpoint metadata (``checkpoints``) and the one results schema (``results``)."""
