// Renders an Ollama Modelfile TEMPLATE the way Ollama does (template/template.go Execute and collate,
// server/routes.go's SYSTEM handling), for tests/test_ollama_template.py. Reads JSON on stdin:
// {"template": "...", "system": "Modelfile SYSTEM or empty", "messages": [{"role": ..., "content": ...}]}
// and writes the rendered prompt to stdout.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

// collate: consecutive messages of one role are merged; system messages stay in the list and are also
// joined into .System.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	msgs := in.Messages
	// the Modelfile's SYSTEM leads unless the conversation starts with a system message
	if len(msgs) > 0 && msgs[0].Role != "system" && in.System != "" {
		msgs = append([]Message{{Role: "system", Content: in.System}}, msgs...)
	}
	system, collated := collate(msgs)
	t := template.Must(template.New("").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"System": system, "Messages": collated, "Response": ""}); err != nil {
		panic(err)
	}
}
