// shaders/gelu.wgsl: to be written
