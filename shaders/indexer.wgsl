// shaders/indexer.wgsl: to be written
