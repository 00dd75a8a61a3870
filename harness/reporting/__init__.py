"""Parts of the report that stand alone: the paper table, paired statistics, the HTML page and the saved
test embeddings (retrieval grids, embedding maps). ``harness.report`` assembles them."""
