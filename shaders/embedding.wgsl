// shaders/embedding.wgsl: to be written
