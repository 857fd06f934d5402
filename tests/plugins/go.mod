module wasmgate.test/plugins

go 1.24
