// shaders/select.wgsl: to be written
