package bench

import (
	"math"
	"slices"
)

// Median returns the median of xs, ignoring NaNs; NaN when nothing is left.
func Median(xs []float64) float64 {
	v := make([]float64, 0, len(xs))
	for _, x := range xs {
		if !math.IsNaN(x) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return math.NaN()
	}
	slices.Sort(v)
	mid := len(v) / 2
	if len(v)%2 == 1 {
		return v[mid]
	}
	return (v[mid-1] + v[mid]) / 2
}

// CPUPerGB is CPU seconds per 10⁹ bytes moved; NaN when nothing moved.
func CPUPerGB(cpuSeconds float64, bytes int64) float64 {
	if bytes <= 0 {
		return math.NaN()
	}
	return cpuSeconds / (float64(bytes) / 1e9)
}

// samples collects the runs of each figure for each setup.
type samples map[string]map[string][]float64

func (s samples) add(figure, setup string, v float64) {
	if s[figure] == nil {
		s[figure] = map[string][]float64{}
	}
	s[figure][setup] = append(s[figure][setup], v)
}
