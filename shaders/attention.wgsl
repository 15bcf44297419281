// shaders/attention.wgsl: to be written
