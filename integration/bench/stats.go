package main

import (
	"fmt"
	"math"
	"sort"
)

// Dist summarises samples (microseconds unless the field name says
// otherwise). Percentiles are nearest-rank: with fewer than 100 samples p99
// is the maximum.
type Dist struct {
	N    int     `json:"n"`
	P50  float64 `json:"p50"`
	P99  float64 `json:"p99"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

// distOf summarises values; NaNs (unknown) are skipped.
func distOf(values []float64) Dist {
	var v []float64
	for _, x := range values {
		if !math.IsNaN(x) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return Dist{}
	}
	sort.Float64s(v)
	sum := 0.0
	for _, x := range v {
		sum += x
	}
	return Dist{N: len(v), P50: rank(v, 0.50), P99: rank(v, 0.99), Max: v[len(v)-1], Mean: sum / float64(len(v))}
}

// rank is the nearest-rank percentile of sorted v.
func rank(v []float64, p float64) float64 {
	i := int(math.Ceil(p*float64(len(v)))) - 1
	return v[max(0, min(i, len(v)-1))]
}

// fmtUS renders microseconds with a readable unit; "-" when there are no
// samples.
func fmtUS(us float64, ok bool) string {
	switch {
	case !ok:
		return "-"
	case us < 1000:
		return fmt.Sprintf("%.0fµs", us)
	case us < 10_000:
		return fmt.Sprintf("%.2fms", us/1000)
	case us < 1_000_000:
		return fmt.Sprintf("%.1fms", us/1000)
	default:
		return fmt.Sprintf("%.2fs", us/1e6)
	}
}

func (d Dist) p50() string { return fmtUS(d.P50, d.N > 0) }
func (d Dist) p99() string { return fmtUS(d.P99, d.N > 0) }
