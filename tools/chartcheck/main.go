// chartcheck renders a Helm chart as `helm template` does and checks every object it renders
// against the types the cluster will decode it into. There is no cluster (nor a helm binary) on
// the build machines, so tests/deploy/test_chart.py runs this instead.
//
// Rendering is Helm's own library (helm.sh/helm/v4: the chart loader, values merging, the
// values.schema.json validation and the template engine, through action.Install in client-only
// dry-run mode, exactly the path `helm template` takes). Every rendered object, hooks included, is
// then decoded STRICTLY (unknown or duplicate fields, wrong types: errors) into:
//   - the Kubernetes API types of k8s.io/api (apps/v1, core/v1, policy/v1, batch/v1),
//   - KEDA's own ScaledObject / TriggerAuthentication types (github.com/kedacore/keda/v2), and
//     KEDA's own admission checks (replica bounds, triggers, fallback),
//   - Strimzi's KafkaTopic, mirrored below (Strimzi publishes no Go module),
//   - the Prometheus Operator's PodMonitor / ServiceMonitor types
//     (github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring).
//
// An unknown apiVersion/kind is an error. Cross-object checks a cluster would otherwise catch at
// apply time: names are DNS subdomains and unique per kind; a Deployment's selector matches its
// pod labels; a PodDisruptionBudget selects some Deployment's pods; a ScaledObject targets a
// rendered Deployment; a pod's ConfigMap/PVC volumes name rendered objects. And what a cluster
// would accept but never scrape: a PodMonitor selects some Deployment's pods and names a port each
// of them declares; a ServiceMonitor selects some Service, names a port of each and, with a
// jobLabel, each has that label; a scrapeTimeout is no longer than its interval (the operator
// skips the monitor otherwise).
//
// Exit 0 and a JSON summary on stdout ({"objects": [{apiVersion, kind, name, source, hook, object}],
// "notes": NOTES.txt rendered}, object being the decoded object re-encoded), or exit 1 with every
// problem on stderr (2: bad usage).
//
//	chartcheck [-f VALUES.yaml]... [-set KEY=VALUE]... [-namespace NS] [-release NAME] CHART_DIR
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"

	kedav1alpha1 "github.com/kedacore/keda/v2/apis/keda/v1alpha1"
	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"github.com/prometheus/common/model"
	"helm.sh/helm/v4/pkg/action"
	"helm.sh/helm/v4/pkg/chart/loader"
	"helm.sh/helm/v4/pkg/cli/values"
	"helm.sh/helm/v4/pkg/getter"
	release "helm.sh/helm/v4/pkg/release/v1"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// KafkaTopic mirrors Strimzi's KafkaTopic custom resource, API version kafka.strimzi.io/v1beta2,
// as defined by Strimzi 0.45.0 (io.strimzi.api.kafka.model.topic.KafkaTopic / KafkaTopicSpec and
// the kafkatopics.kafka.strimzi.io CRD it generates): spec has exactly topicName, partitions
// (minimum 1), replicas (1..32767) and config (a map of Kafka topic settings). Status is written
// by the Topic Operator and has no place in a chart.
type KafkaTopic struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              KafkaTopicSpec `json:"spec"`
}

// KafkaTopicSpec is Strimzi 0.45.0's v1beta2 KafkaTopicSpec.
type KafkaTopicSpec struct {
	TopicName  string         `json:"topicName,omitempty"`
	Partitions *int32         `json:"partitions,omitempty"`
	Replicas   *int32         `json:"replicas,omitempty"`
	Config     map[string]any `json:"config,omitempty"`
}

// known maps apiVersion/kind to a new value of the type it decodes into.
var known = map[string]func() any{
	"v1/ConfigMap":                            func() any { return &corev1.ConfigMap{} },
	"v1/Service":                              func() any { return &corev1.Service{} },
	"v1/ServiceAccount":                       func() any { return &corev1.ServiceAccount{} },
	"v1/PersistentVolumeClaim":                func() any { return &corev1.PersistentVolumeClaim{} },
	"apps/v1/Deployment":                      func() any { return &appsv1.Deployment{} },
	"batch/v1/Job":                            func() any { return &batchv1.Job{} },
	"policy/v1/PodDisruptionBudget":           func() any { return &policyv1.PodDisruptionBudget{} },
	"keda.sh/v1alpha1/ScaledObject":           func() any { return &kedav1alpha1.ScaledObject{} },
	"keda.sh/v1alpha1/TriggerAuthentication":  func() any { return &kedav1alpha1.TriggerAuthentication{} },
	"kafka.strimzi.io/v1beta2/KafkaTopic":     func() any { return &KafkaTopic{} },
	"monitoring.coreos.com/v1/PodMonitor":     func() any { return &monitoringv1.PodMonitor{} },
	"monitoring.coreos.com/v1/ServiceMonitor": func() any { return &monitoringv1.ServiceMonitor{} },
}

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

type object struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Name       string `json:"name"`
	Source     string `json:"source"`
	Hook       bool   `json:"hook"`
	Object     any    `json:"object"`
}

func main() {
	opts, chartDir, namespace, releaseName := parseArgs(os.Args[1:])
	objects, notes, err := render(chartDir, opts, namespace, releaseName)
	if err != nil {
		fail(err)
	}
	if problems := check(objects); len(problems) > 0 {
		fail(errors.New(strings.Join(problems, "\n")))
	}
	out, err := json.MarshalIndent(map[string]any{"objects": objects, "notes": notes}, "", "  ")
	if err != nil {
		fail(err)
	}
	os.Stdout.Write(append(out, '\n'))
}

func parseArgs(args []string) (*values.Options, string, string, string) {
	opts := &values.Options{}
	namespace, releaseName, chartDir := "default", "release-name", ""
	for i := 0; i < len(args); i++ {
		next := func() string {
			if i+1 >= len(args) {
				usage("missing value after " + args[i])
			}
			i++
			return args[i]
		}
		switch args[i] {
		case "-f", "--values":
			opts.ValueFiles = append(opts.ValueFiles, next())
		case "-set", "--set":
			opts.Values = append(opts.Values, next())
		case "-namespace", "--namespace", "-n":
			namespace = next()
		case "-release", "--release":
			releaseName = next()
		case "-h", "--help":
			usage("")
		default:
			if strings.HasPrefix(args[i], "-") || chartDir != "" {
				usage("unexpected argument " + args[i])
			}
			chartDir = args[i]
		}
	}
	if chartDir == "" {
		usage("no chart directory")
	}
	return opts, chartDir, namespace, releaseName
}

func usage(msg string) {
	if msg != "" {
		fmt.Fprintln(os.Stderr, "chartcheck:", msg)
	}
	fmt.Fprintln(os.Stderr, "usage: chartcheck [-f VALUES.yaml]... [-set KEY=VALUE]... [-namespace NS] [-release NAME] CHART_DIR")
	os.Exit(2)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "chartcheck:", err)
	os.Exit(1)
}

// render does what `helm template RELEASE CHART_DIR -f ... --namespace NS` does.
func render(chartDir string, opts *values.Options, namespace, releaseName string) ([]object, string, error) {
	vals, err := opts.MergeValues(getter.Getters())
	if err != nil {
		return nil, "", fmt.Errorf("values: %w", err)
	}
	chrt, err := loader.Load(chartDir)
	if err != nil {
		return nil, "", fmt.Errorf("loading chart %s: %w", chartDir, err)
	}
	client := action.NewInstall(action.NewConfiguration())
	client.DryRunStrategy = action.DryRunClient
	client.ReleaseName = releaseName
	client.Namespace = namespace
	client.Replace = true
	rel, err := client.Run(chrt, vals)
	if err != nil {
		return nil, "", fmt.Errorf("rendering: %w", err)
	}
	r, ok := rel.(*release.Release)
	if !ok {
		return nil, "", fmt.Errorf("unexpected release type %T", rel)
	}
	var objects []object
	var problems []string
	for _, doc := range splitDocs(r.Manifest) {
		o, err := decode(doc.source, doc.body, false)
		if err != nil {
			problems = append(problems, err.Error())
			continue
		}
		objects = append(objects, o)
	}
	for _, h := range r.Hooks {
		o, err := decode(h.Path, h.Manifest, true)
		if err != nil {
			problems = append(problems, err.Error())
			continue
		}
		objects = append(objects, o)
	}
	if len(problems) > 0 {
		return nil, "", errors.New(strings.Join(problems, "\n"))
	}
	return objects, r.Info.Notes, nil
}

type doc struct{ source, body string }

var sourceLine = regexp.MustCompile(`(?m)^# Source: (.+)$`)
var separator = regexp.MustCompile(`(?m)^---[ \t]*$`)

func splitDocs(manifest string) []doc {
	var docs []doc
	for _, part := range separator.Split(manifest, -1) {
		if strings.TrimSpace(sourceLine.ReplaceAllString(part, "")) == "" {
			continue
		}
		source := "?"
		if m := sourceLine.FindStringSubmatch(part); m != nil {
			source = m[1]
		}
		docs = append(docs, doc{source, part})
	}
	return docs
}

func decode(source, body string, hook bool) (object, error) {
	js, err := yaml.YAMLToJSONStrict([]byte(body))
	if err != nil {
		return object{}, fmt.Errorf("%s: not valid YAML: %w", source, err)
	}
	var meta metav1.TypeMeta
	if err := json.Unmarshal(js, &meta); err != nil {
		return object{}, fmt.Errorf("%s: not an object: %w", source, err)
	}
	newObj, ok := known[meta.APIVersion+"/"+meta.Kind]
	if !ok {
		return object{}, fmt.Errorf("%s: unknown kind %q of apiVersion %q (chartcheck knows %s)",
			source, meta.Kind, meta.APIVersion, strings.Join(knownKinds(), ", "))
	}
	typed := newObj()
	strict, err := sigsjson.UnmarshalStrict(js, typed, sigsjson.DisallowUnknownFields)
	if err != nil {
		return object{}, fmt.Errorf("%s: %s %s: %w", source, meta.Kind, nameOf(js), err)
	}
	if len(strict) > 0 {
		msgs := make([]string, len(strict))
		for i, e := range strict {
			msgs[i] = e.Error()
		}
		return object{}, fmt.Errorf("%s: %s %s: %s", source, meta.Kind, nameOf(js), strings.Join(msgs, "; "))
	}
	name := typed.(metav1.Object).GetName()
	return object{meta.APIVersion, meta.Kind, name, source, hook, typed}, nil
}

func nameOf(js []byte) string {
	var m struct {
		Metadata struct {
			Name string `json:"name"`
		} `json:"metadata"`
	}
	_ = json.Unmarshal(js, &m)
	return strconv.Quote(m.Metadata.Name)
}

func knownKinds() []string {
	var ks []string
	for k := range known {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// check runs what the API server, the KEDA admission webhook and the Strimzi CRD would refuse.
func check(objects []object) []string {
	var problems []string
	bad := func(o object, format string, args ...any) {
		problems = append(problems, fmt.Sprintf("%s: %s %q: %s", o.Source, o.Kind, o.Name, fmt.Sprintf(format, args...)))
	}
	seen := map[string]bool{}
	byKind := map[string]map[string]object{}
	for _, o := range objects {
		key := o.Kind + "/" + o.Name
		if seen[key] {
			bad(o, "rendered twice")
		}
		seen[key] = true
		if byKind[o.Kind] == nil {
			byKind[o.Kind] = map[string]object{}
		}
		byKind[o.Kind][o.Name] = o
		for _, msg := range validation.IsDNS1123Subdomain(o.Name) {
			bad(o, "metadata.name: %s", msg)
		}
		if ls := o.Object.(metav1.Object).GetLabels(); ls != nil {
			for k, v := range ls {
				for _, msg := range validation.IsQualifiedName(k) {
					bad(o, "label key %q: %s", k, msg)
				}
				for _, msg := range validation.IsValidLabelValue(v) {
					bad(o, "label %s value %q: %s", k, v, msg)
				}
			}
		}
	}
	var podLabels []labels.Set
	var pods []renderedPod
	for _, o := range objects {
		var spec *corev1.PodSpec
		switch obj := o.Object.(type) {
		case *appsv1.Deployment:
			sel, err := metav1.LabelSelectorAsSelector(obj.Spec.Selector)
			switch {
			case obj.Spec.Selector == nil || err != nil || sel.Empty():
				bad(o, "spec.selector is missing or invalid (%v)", err)
			case !sel.Matches(labels.Set(obj.Spec.Template.Labels)):
				bad(o, "spec.selector %s does not match the pod template's labels %v", sel, obj.Spec.Template.Labels)
			}
			podLabels = append(podLabels, obj.Spec.Template.Labels)
			pods = append(pods, renderedPod{o.Name, obj.Spec.Template.Labels, &obj.Spec.Template.Spec})
			spec = &obj.Spec.Template.Spec
		case *batchv1.Job:
			spec = &obj.Spec.Template.Spec
			if spec.RestartPolicy != corev1.RestartPolicyNever && spec.RestartPolicy != corev1.RestartPolicyOnFailure {
				bad(o, "a Job's restartPolicy must be Never or OnFailure")
			}
		}
		if spec != nil {
			problems = append(problems, checkPod(o, spec, byKind)...)
		}
	}
	for _, o := range objects {
		switch obj := o.Object.(type) {
		case *policyv1.PodDisruptionBudget:
			sel, err := metav1.LabelSelectorAsSelector(obj.Spec.Selector)
			if obj.Spec.Selector == nil || err != nil || sel.Empty() {
				bad(o, "spec.selector is missing or invalid (%v)", err)
				continue
			}
			if (obj.Spec.MinAvailable == nil) == (obj.Spec.MaxUnavailable == nil) {
				bad(o, "set exactly one of minAvailable and maxUnavailable")
			}
			matched := false
			for _, l := range podLabels {
				matched = matched || sel.Matches(l)
			}
			if !matched {
				bad(o, "spec.selector %s selects no rendered Deployment's pods", sel)
			}
		case *kedav1alpha1.ScaledObject:
			problems = append(problems, checkScaledObject(o, obj, byKind)...)
		case *monitoringv1.PodMonitor:
			problems = append(problems, checkPodMonitor(o, obj, pods)...)
		case *monitoringv1.ServiceMonitor:
			problems = append(problems, checkServiceMonitor(o, obj, byKind)...)
		case *KafkaTopic:
			if obj.Labels["strimzi.io/cluster"] == "" {
				bad(o, "no strimzi.io/cluster label: the Topic Operator ignores it")
			}
			if obj.Spec.Partitions != nil && *obj.Spec.Partitions < 1 {
				bad(o, "spec.partitions must be at least 1")
			}
			if obj.Spec.Replicas != nil && (*obj.Spec.Replicas < 1 || *obj.Spec.Replicas > 32767) {
				bad(o, "spec.replicas must be between 1 and 32767")
			}
			for k, v := range obj.Spec.Config {
				switch v.(type) {
				case string, float64, bool:
				default:
					bad(o, "spec.config.%s: %T is not a Kafka setting value", k, v)
				}
			}
		}
	}
	return problems
}

func checkPod(o object, spec *corev1.PodSpec, byKind map[string]map[string]object) []string {
	var problems []string
	bad := func(format string, args ...any) {
		problems = append(problems, fmt.Sprintf("%s: %s %q: %s", o.Source, o.Kind, o.Name, fmt.Sprintf(format, args...)))
	}
	volumes := map[string]bool{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = true
		if v.ConfigMap != nil {
			if _, ok := byKind["ConfigMap"][v.ConfigMap.Name]; !ok {
				bad("volume %s: ConfigMap %q is not rendered by the chart", v.Name, v.ConfigMap.Name)
			}
		}
		if v.PersistentVolumeClaim != nil {
			if _, ok := byKind["PersistentVolumeClaim"][v.PersistentVolumeClaim.ClaimName]; !ok {
				bad("volume %s: PersistentVolumeClaim %q is not rendered by the chart", v.Name,
					v.PersistentVolumeClaim.ClaimName)
			}
		}
	}
	if len(spec.Containers) == 0 {
		bad("no containers")
	}
	for _, c := range spec.Containers {
		if c.Name == "" || c.Image == "" {
			bad("a container without a name or image")
		}
		for _, m := range c.VolumeMounts {
			if !volumes[m.Name] {
				bad("container %s mounts volume %q that the pod does not declare", c.Name, m.Name)
			}
		}
		ports := map[string]bool{}
		for _, p := range c.Ports {
			ports[p.Name] = true
		}
		for what, probe := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe,
			"startup": c.StartupProbe} {
			if probe != nil && probe.HTTPGet != nil && probe.HTTPGet.Port.StrVal != "" && !ports[probe.HTTPGet.Port.StrVal] {
				bad("container %s: %s probe names port %q that the container does not declare", c.Name, what,
					probe.HTTPGet.Port.StrVal)
			}
		}
	}
	return problems
}

func checkScaledObject(o object, so *kedav1alpha1.ScaledObject, byKind map[string]map[string]object) []string {
	var problems []string
	bad := func(format string, args ...any) {
		problems = append(problems, fmt.Sprintf("%s: %s %q: %s", o.Source, o.Kind, o.Name, fmt.Sprintf(format, args...)))
	}
	// KEDA's own admission checks that need no cluster
	if err := kedav1alpha1.CheckReplicaCountBoundsAreValid(so); err != nil {
		bad("%v", err)
	}
	if err := kedav1alpha1.ValidateTriggers(so.Spec.Triggers); err != nil {
		bad("%v", err)
	}
	if err := kedav1alpha1.CheckFallbackValid(so); err != nil {
		bad("%v", err)
	}
	ref := so.Spec.ScaleTargetRef
	if ref == nil {
		bad("no spec.scaleTargetRef")
	} else {
		kind := ref.Kind
		if kind == "" {
			kind = "Deployment"
		}
		if _, ok := byKind[kind][ref.Name]; !ok {
			bad("spec.scaleTargetRef names %s %q, which the chart does not render", kind, ref.Name)
		}
	}
	for i, t := range so.Spec.Triggers {
		if t.AuthenticationRef != nil && (t.AuthenticationRef.Kind == "" || t.AuthenticationRef.Kind == "TriggerAuthentication") {
			if _, ok := byKind["TriggerAuthentication"][t.AuthenticationRef.Name]; !ok {
				// an operator-made TriggerAuthentication is fine: say so only on stderr
				fmt.Fprintf(os.Stderr, "chartcheck: note: %s trigger %d uses TriggerAuthentication %q, not rendered by the chart\n",
					o.Name, i, t.AuthenticationRef.Name)
			}
		}
		if t.Type != "kafka" {
			continue
		}
		for _, k := range []string{"bootstrapServers", "consumerGroup", "topic", "lagThreshold"} {
			if strings.TrimSpace(t.Metadata[k]) == "" {
				bad("trigger %d (kafka): metadata.%s is required", i, k)
			}
		}
		for _, k := range []string{"lagThreshold", "activationLagThreshold"} {
			if v, ok := t.Metadata[k]; ok {
				if n, err := strconv.ParseInt(v, 10, 64); err != nil || n < 0 || (k == "lagThreshold" && n == 0) {
					bad("trigger %d (kafka): metadata.%s %q is not a positive integer", i, k, v)
				}
			}
		}
	}
	return problems
}

// renderedPod is the pod template of a rendered Deployment.
type renderedPod struct {
	owner  string
	labels labels.Set
	spec   *corev1.PodSpec
}

// monitorSelector is a monitor's spec.selector, refused when invalid or empty (an empty one would
// select every pod or Service of the namespace).
func monitorSelector(selector *metav1.LabelSelector) (labels.Selector, error) {
	sel, err := metav1.LabelSelectorAsSelector(selector)
	if err == nil && sel.Empty() {
		err = errors.New("empty: it would select everything in the namespace")
	}
	return sel, err
}

// checkScrapeDurations refuses what the Prometheus Operator refuses of an endpoint's interval and
// scrapeTimeout (its CompareScrapeTimeoutToScrapeInterval): unparsable durations, a timeout longer
// than the interval. Unset ones are the Prometheus's own, unknown here.
func checkScrapeDurations(interval, timeout monitoringv1.Duration) error {
	var parsed [2]model.Duration
	for i, d := range []monitoringv1.Duration{interval, timeout} {
		if d == "" {
			continue
		}
		v, err := model.ParseDuration(string(d))
		if err != nil {
			return err
		}
		if v <= 0 {
			return fmt.Errorf("duration %q is not positive", d)
		}
		parsed[i] = v
	}
	if parsed[0] > 0 && parsed[1] > parsed[0] {
		return fmt.Errorf("scrapeTimeout %q greater than interval %q", timeout, interval)
	}
	return nil
}

func checkPodMonitor(o object, pm *monitoringv1.PodMonitor, pods []renderedPod) []string {
	var problems []string
	bad := func(format string, args ...any) {
		problems = append(problems, fmt.Sprintf("%s: %s %q: %s", o.Source, o.Kind, o.Name, fmt.Sprintf(format, args...)))
	}
	sel, err := monitorSelector(&pm.Spec.Selector)
	if err != nil {
		bad("spec.selector: %v", err)
		return problems
	}
	var selected []renderedPod
	for _, p := range pods {
		if sel.Matches(p.labels) {
			selected = append(selected, p)
		}
	}
	if len(selected) == 0 {
		bad("spec.selector %s selects no rendered Deployment's pods", sel)
	}
	if len(pm.Spec.PodMetricsEndpoints) == 0 {
		bad("no spec.podMetricsEndpoints")
	}
	for i, ep := range pm.Spec.PodMetricsEndpoints {
		if err := checkScrapeDurations(ep.Interval, ep.ScrapeTimeout); err != nil {
			bad("podMetricsEndpoints[%d]: %v", i, err)
		}
		port := podMetricsPort(ep)
		if port == "" {
			bad("podMetricsEndpoints[%d]: no port name", i)
			continue
		}
		for _, p := range selected {
			if !declaresPort(p.spec, port) {
				bad("podMetricsEndpoints[%d] names port %q, which no container of Deployment %q's pods declares",
					i, port, p.owner)
			}
		}
	}
	return problems
}

func declaresPort(spec *corev1.PodSpec, name string) bool {
	for _, c := range spec.Containers {
		for _, p := range c.Ports {
			if p.Name == name {
				return true
			}
		}
	}
	return false
}

func checkServiceMonitor(o object, sm *monitoringv1.ServiceMonitor, byKind map[string]map[string]object) []string {
	var problems []string
	bad := func(format string, args ...any) {
		problems = append(problems, fmt.Sprintf("%s: %s %q: %s", o.Source, o.Kind, o.Name, fmt.Sprintf(format, args...)))
	}
	sel, err := monitorSelector(&sm.Spec.Selector)
	if err != nil {
		bad("spec.selector: %v", err)
		return problems
	}
	var selected []*corev1.Service
	for _, s := range byKind["Service"] {
		if svc := s.Object.(*corev1.Service); sel.Matches(labels.Set(svc.Labels)) {
			selected = append(selected, svc)
		}
	}
	if len(selected) == 0 {
		bad("spec.selector %s selects no rendered Service", sel)
	}
	for _, svc := range selected {
		// the operator falls back to the Service's name for job when the label is missing: a silent rename
		if sm.Spec.JobLabel != "" && svc.Labels[sm.Spec.JobLabel] == "" {
			bad("jobLabel %q: Service %q has no such label, so its job would be the Service's name",
				sm.Spec.JobLabel, svc.Name)
		}
	}
	if len(sm.Spec.Endpoints) == 0 {
		bad("no spec.endpoints")
	}
	for i, ep := range sm.Spec.Endpoints {
		if err := checkScrapeDurations(ep.Interval, ep.ScrapeTimeout); err != nil {
			bad("endpoints[%d]: %v", i, err)
		}
		if ep.Port == "" {
			bad("endpoints[%d]: no port name", i)
			continue
		}
		for _, svc := range selected {
			found := false
			for _, p := range svc.Spec.Ports {
				found = found || p.Name == ep.Port
			}
			if !found {
				bad("endpoints[%d] names port %q, which Service %q does not have", i, ep.Port, svc.Name)
			}
		}
	}
	return problems
}

// podMetricsPort is the container port name a PodMonitor endpoint scrapes ("": none named).
func podMetricsPort(ep monitoringv1.PodMetricsEndpoint) string {
	if ep.Port == nil {
		return ""
	}
	return *ep.Port
}
