package abi

import "unsafe"

// Status codes of the shared-data, shared-queue and metric calls.
const (
	InvalidMemoryAccess Status = 6
	Empty               Status = 7
	CasMismatch         Status = 8
)

// MetricType is the type argument of proxy_define_metric.
type MetricType uint32

const (
	Counter   MetricType = 0
	Gauge     MetricType = 1
	Histogram MetricType = 2
)

//go:wasmimport env proxy_get_shared_data
func proxyGetSharedData(key unsafe.Pointer, keySize uint32, retValue unsafe.Pointer, retValueSize unsafe.Pointer, retCas unsafe.Pointer) uint32

//go:wasmimport env proxy_set_shared_data
func proxySetSharedData(key unsafe.Pointer, keySize uint32, value unsafe.Pointer, valueSize uint32, cas uint32) uint32

//go:wasmimport env proxy_register_shared_queue
func proxyRegisterSharedQueue(name unsafe.Pointer, nameSize uint32, retToken unsafe.Pointer) uint32

//go:wasmimport env proxy_resolve_shared_queue
func proxyResolveSharedQueue(vmID unsafe.Pointer, vmIDSize uint32, name unsafe.Pointer, nameSize uint32, retToken unsafe.Pointer) uint32

//go:wasmimport env proxy_enqueue_shared_queue
func proxyEnqueueSharedQueue(token uint32, value unsafe.Pointer, valueSize uint32) uint32

//go:wasmimport env proxy_dequeue_shared_queue
func proxyDequeueSharedQueue(token uint32, retValue unsafe.Pointer, retValueSize unsafe.Pointer) uint32

//go:wasmimport env proxy_define_metric
func proxyDefineMetric(metricType uint32, name unsafe.Pointer, nameSize uint32, retID unsafe.Pointer) uint32

//go:wasmimport env proxy_increment_metric
func proxyIncrementMetric(id uint32, offset int64) uint32

//go:wasmimport env proxy_record_metric
func proxyRecordMetric(id uint32, value uint64) uint32

//go:wasmimport env proxy_get_metric
func proxyGetMetric(id uint32, retValue unsafe.Pointer) uint32

// GetSharedData returns the value of key in this VM's shared data and its CAS.
func GetSharedData(key string) ([]byte, uint32, Status) {
	hostAlloc()
	var addr, size, cas uint32
	st := Status(proxyGetSharedData(strPtr(key), uint32(len(key)), unsafe.Pointer(&addr), unsafe.Pointer(&size), unsafe.Pointer(&cas)))
	if st != OK {
		return nil, 0, st
	}
	b, ok := claim(addr, size)
	if !ok {
		return nil, 0, BadArgument
	}
	return b, cas, OK
}

// SetSharedData stores value under key; cas 0 stores unconditionally, any
// other value only if it is the key's current CAS (else CasMismatch).
func SetSharedData(key string, value []byte, cas uint32) Status {
	return Status(proxySetSharedData(strPtr(key), uint32(len(key)), bytesPtr(value), uint32(len(value)), cas))
}

// RegisterSharedQueue creates (or takes over) the queue name of this VM's
// vm_id; proxy_on_queue_ready of this root context hears of new items.
func RegisterSharedQueue(name string) (uint32, Status) {
	var token uint32
	st := Status(proxyRegisterSharedQueue(strPtr(name), uint32(len(name)), unsafe.Pointer(&token)))
	return token, st
}

// ResolveSharedQueue finds the queue name registered by a VM with vmID
// (empty: this VM's vm_id).
func ResolveSharedQueue(vmID, name string) (uint32, Status) {
	var token uint32
	st := Status(proxyResolveSharedQueue(strPtr(vmID), uint32(len(vmID)), strPtr(name), uint32(len(name)), unsafe.Pointer(&token)))
	return token, st
}

// EnqueueSharedQueue appends value to the queue.
func EnqueueSharedQueue(token uint32, value []byte) Status {
	return Status(proxyEnqueueSharedQueue(token, bytesPtr(value), uint32(len(value))))
}

// DequeueSharedQueue takes the oldest value off the queue (Empty when none).
func DequeueSharedQueue(token uint32) ([]byte, Status) {
	hostAlloc()
	var addr, size uint32
	st := Status(proxyDequeueSharedQueue(token, unsafe.Pointer(&addr), unsafe.Pointer(&size)))
	if st != OK {
		return nil, st
	}
	b, ok := claim(addr, size)
	if !ok {
		return nil, BadArgument
	}
	return b, OK
}

// DefineMetric returns the id of the metric name of type t.
func DefineMetric(t MetricType, name string) (uint32, Status) {
	var id uint32
	st := Status(proxyDefineMetric(uint32(t), strPtr(name), uint32(len(name)), unsafe.Pointer(&id)))
	return id, st
}

// IncrementMetric adds offset to a counter (offset > 0) or gauge.
func IncrementMetric(id uint32, offset int64) Status {
	return Status(proxyIncrementMetric(id, offset))
}

// RecordMetric adds to a counter, sets a gauge or records a histogram value.
func RecordMetric(id uint32, value uint64) Status {
	return Status(proxyRecordMetric(id, value))
}

// GetMetric returns a counter's or gauge's value.
func GetMetric(id uint32) (uint64, Status) {
	var value uint64
	st := Status(proxyGetMetric(id, unsafe.Pointer(&value)))
	return value, st
}
