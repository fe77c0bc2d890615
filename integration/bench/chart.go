package main

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"math"
	"os"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

// Chart geometry (pixels).
const (
	chartH      = 580
	plotTop     = 50
	plotBottom  = 470 // y of the time axis
	plotLeft    = 70
	barW        = 13
	barGap      = 2
	groupGap    = 18
	legendRowH  = 16
	minChartW   = 640
	chartRightM = 60
)

var (
	white   = color.RGBA{255, 255, 255, 255}
	black   = color.RGBA{0, 0, 0, 255}
	grid    = color.RGBA{225, 225, 225, 255}
	palette = map[string]color.RGBA{
		"seamless":        {31, 119, 180, 255},
		"full-copy":       {255, 127, 14, 255},
		"commit-tar":      {214, 39, 40, 255},
		"floor":           {127, 127, 127, 255},
		"ours-v1":         {44, 160, 44, 255},
		"libcontainer-v1": {148, 103, 189, 255},
		"ours-v2":         {23, 190, 207, 255},
		"libcontainer-v2": {140, 86, 75, 255},
	}
	fallbackColor = color.RGBA{188, 189, 34, 255}
)

// group is the bars of one scenario (or of the freezer section), labelled
// on two lines under the axis.
type group struct {
	key           string
	label, label2 string
	rows          []*Row
}

// drawChart draws the probe-measured pause per strategy and scenario on a
// log scale: a bar up to p50, a whisker up to p99, a tick at the tool's
// clock p50.
func drawChart(path string, rows []Row) error {
	groups, strategies := groupRows(rows)
	width := plotLeft + chartRightM
	for _, g := range groups {
		width += len(g.rows)*(barW+barGap) + groupGap
	}
	width = max(width, minChartW)
	img := image.NewRGBA(image.Rect(0, 0, width, chartH))
	draw.Draw(img, img.Bounds(), &image.Uniform{white}, image.Point{}, draw.Src)
	lo, hi := logRange(rows)
	y := func(v float64) int {
		f := (math.Log10(math.Max(v, math.Pow(10, lo))) - lo) / (hi - lo)
		return plotBottom - int(f*float64(plotBottom-plotTop))
	}
	drawAxis(img, width, lo, hi, y)
	drawGroups(img, groups, y)
	drawLegend(img, strategies, width)
	text(img, plotLeft, 20, "pause felt in the container (probe), log scale")
	text(img, plotLeft, 36, "bar p50, whisker p99, dash: tool clock p50; * inconsistent")
	return writePNG(path, img)
}

// groupRows groups rows by filesystem and scenario, keeping their order,
// and lists the strategies in order of appearance.
func groupRows(rows []Row) ([]group, []string) {
	var groups []group
	var strategies []string
	seen := map[string]bool{}
	for i := range rows {
		r := &rows[i]
		g := group{key: r.Section + "/" + r.FS + "/" + r.label(), label: r.Scenario, label2: r.Load}
		if r.Section == "freezer" {
			g.label, g.label2 = "freezer", r.Scenario
		}
		if r.FS != fsExt4 {
			g.label2 += "," + r.FS
		}
		if len(groups) == 0 || groups[len(groups)-1].key != g.key {
			groups = append(groups, g)
		}
		groups[len(groups)-1].rows = append(groups[len(groups)-1].rows, r)
		if !seen[r.Strategy] {
			seen[r.Strategy] = true
			strategies = append(strategies, r.Strategy)
		}
	}
	return groups, strategies
}

// logRange returns the decades (log10 µs) spanning every p50 and p99.
func logRange(rows []Row) (lo, hi float64) {
	lo, hi = 1, 2 // 10 µs .. 100 µs at least
	for _, r := range rows {
		for _, v := range []float64{r.Probe.P50, r.Probe.P99, r.Pause.P50} {
			if v > 0 {
				lo, hi = math.Min(lo, math.Floor(math.Log10(v))), math.Max(hi, math.Ceil(math.Log10(v)))
			}
		}
	}
	return lo, hi
}

// drawAxis draws the decade grid lines and their labels.
func drawAxis(img *image.RGBA, width int, lo, hi float64, y func(float64) int) {
	for d := lo; d <= hi; d++ {
		yy := y(math.Pow(10, d))
		hline(img, plotLeft, width-chartRightM, yy, grid)
		text(img, 4, yy+4, decadeLabel(int(d)))
	}
	hline(img, plotLeft, width-chartRightM, plotBottom, black)
	vline(img, plotLeft, plotTop, plotBottom, black)
}

// drawGroups draws each group's bars and label.
func drawGroups(img *image.RGBA, groups []group, y func(float64) int) {
	x := plotLeft + groupGap/2
	for _, g := range groups {
		start := x
		for _, r := range g.rows {
			drawBar(img, x, r, y)
			x += barW + barGap
		}
		text(img, start, plotBottom+15, g.label)
		text(img, start, plotBottom+28, g.label2)
		x += groupGap
	}
}

// drawBar draws one row: bar to probe p50, whisker to p99, dash at clock p50.
func drawBar(img *image.RGBA, x int, r *Row, y func(float64) int) {
	c := colorOf(r.Strategy)
	if r.Probe.N > 0 {
		fillRect(img, x, y(r.Probe.P50), x+barW, plotBottom, c)
		mid := x + barW/2
		vline(img, mid, y(r.Probe.P99), y(r.Probe.P50), black)
		hline(img, mid-3, mid+3, y(r.Probe.P99), black)
	}
	if r.Pause.N > 0 {
		hline(img, x-1, x+barW+1, y(r.Pause.P50), black)
	}
	if !r.Consistent && r.Section == "pause" {
		text(img, x+2, y(math.Max(r.Probe.P99, r.Probe.P50))-4, "*")
	}
}

// drawLegend draws one swatch per strategy under the axis labels.
func drawLegend(img *image.RGBA, strategies []string, width int) {
	x, yy := plotLeft, plotBottom+50
	for _, s := range strategies {
		w := 24 + 7*len(s)
		if x+w > width-chartRightM {
			x, yy = plotLeft, yy+legendRowH
		}
		fillRect(img, x, yy-9, x+12, yy+1, colorOf(s))
		text(img, x+16, yy, s)
		x += w + 8
	}
}

// decadeLabel names 10^d microseconds in ASCII (the font has no µ).
func decadeLabel(d int) string {
	units := []string{"us", "ms", "s"}
	u := min(max(d/3, 0), len(units)-1)
	v := math.Pow(10, float64(d-3*u))
	if d < 0 {
		v = math.Pow(10, float64(d))
	}
	return fmt.Sprintf("%g%s", v, units[u])
}

func colorOf(strategy string) color.RGBA {
	if c, ok := palette[strategy]; ok {
		return c
	}
	return fallbackColor
}

func fillRect(img *image.RGBA, x0, y0, x1, y1 int, c color.Color) {
	draw.Draw(img, image.Rect(x0, y0, x1, y1), &image.Uniform{c}, image.Point{}, draw.Src)
}

func hline(img *image.RGBA, x0, x1, y int, c color.Color) { fillRect(img, x0, y, x1+1, y+1, c) }
func vline(img *image.RGBA, x, y0, y1 int, c color.Color) { fillRect(img, x, y0, x+1, y1+1, c) }

// text draws s with its baseline at (x, y) in the 7x13 bitmap font.
func text(img *image.RGBA, x, y int, s string) {
	d := &font.Drawer{Dst: img, Src: image.NewUniform(black), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
	d.DrawString(s)
}

func writePNG(path string, img image.Image) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("chart: %w", err)
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return fmt.Errorf("chart: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("chart: %w", err)
	}
	return nil
}
