"""The chunk size: the search on the loaded model, its cache, and the warm-up that runs them."""
