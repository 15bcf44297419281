// shaders/layernorm.wgsl: to be written
