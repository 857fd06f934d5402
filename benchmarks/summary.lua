-- wrk script: print the run's figures as one JSON line (latencies in microseconds).
-- Only done() is defined, so wrk keeps its fast path for requests and responses.
done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_SUMMARY {"requests":%d,"duration_us":%d,"bytes":%d,"p50":%d,"p90":%d,"p99":%d,' ..
      '"max":%d,"mean":%.1f,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
