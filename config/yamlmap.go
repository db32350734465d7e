package config

import "gopkg.in/yaml.v3"

// pairs returns the key/value pairs of a mapping node as mihomo's YAML
// decoder sees them: an alias stands for the node it names (dns: *common),
// and a merge key (<<: *common, or a list of aliases) brings in the pairs of
// the mappings it names under the keys the mapping does not set itself, the
// first mapping of a list winning. ok is false when n is not a mapping.
func pairs(n *yaml.Node) (out [][2]*yaml.Node, ok bool) {
	n = resolveAlias(n)
	if n.Kind != yaml.MappingNode {
		return nil, false
	}
	taken := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if !isMergeKey(n.Content[i]) {
			taken[n.Content[i].Value] = true
		}
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], resolveAlias(n.Content[i+1])
		if !isMergeKey(k) {
			continue
		}
		from := []*yaml.Node{v}
		if v.Kind == yaml.SequenceNode {
			from = v.Content
		}
		for _, m := range from {
			ps, ok := pairs(m)
			if !ok {
				continue
			}
			for _, kv := range ps {
				if !taken[kv[0].Value] {
					taken[kv[0].Value] = true
					out = append(out, kv)
				}
			}
		}
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if !isMergeKey(n.Content[i]) {
			out = append(out, [2]*yaml.Node{n.Content[i], n.Content[i+1]})
		}
	}
	return out, true
}

func resolveAlias(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n
}

func isMergeKey(k *yaml.Node) bool { return k.Kind == yaml.ScalarNode && k.ShortTag() == "!!merge" }
